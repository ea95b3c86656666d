-- Restore: puts back what an instance knows of an account's counters after
-- Redis lost them (a restart, a flush) or fell behind (settlements made
-- while it could not be reached). Raises `used` of the month and the day to
-- the instance's figures, adds the reservations it holds that Redis does
-- not, and marks the month primed, which capped admissions require.
--
-- KEYS[1] month hash, KEYS[2] day hash, KEYS[3] reservations ZSET,
-- KEYS[4] records HASH.
-- ARGV[1] month used, ARGV[2] day used, ARGV[3] month ttl ms,
-- ARGV[4] day ttl ms, then per reservation three values: its id, its
-- units, the ms until it lapses.

local month, day, reservations, records = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local now_ms = math.floor(now_us() / 1000)
purge(reservations, records, now_ms)

local function raise(key, total)
  local used = tonumber(redis.call('HGET', key, 'used')) or 0
  if total > used then
    redis.call('HSET', key, 'used', int(total))
  end
end
raise(month, tonumber(ARGV[1]))
raise(day, tonumber(ARGV[2]))

for i = 5, #ARGV - 2, 3 do
  local id, units, ttl = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  if redis.call('HEXISTS', records, id) == 0 then
    redis.call('HINCRBY', month, 'reserved', int(units))
    redis.call('HINCRBY', day, 'reserved', int(units))
    redis.call('ZADD', reservations, int(now_ms + ttl), id)
    redis.call('HSET', records, id, cjson.encode({u = int(units), m = month, d = day}))
  end
end

redis.call('HSET', month, 'primed', 1)
redis.call('PEXPIRE', month, ARGV[3])
redis.call('PEXPIRE', day, ARGV[4])
redis.call('PEXPIRE', reservations, ARGV[3])
redis.call('PEXPIRE', records, ARGV[3])
return 0
