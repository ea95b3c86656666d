-- An account's period counters, after purging lapsed reservations.
--
-- KEYS[1] month hash, KEYS[2] day hash, KEYS[3] reservations ZSET,
-- KEYS[4] records HASH.
-- Returns {month used, month reserved, day used, day reserved, in progress}.

purge(KEYS[3], KEYS[4], math.floor(now_us() / 1000))
local month_used, month_reserved = counters(KEYS[1])
local day_used, day_reserved = counters(KEYS[2])
return {month_used, month_reserved, day_used, day_reserved, redis.call('ZCARD', KEYS[3])}
