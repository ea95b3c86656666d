-- Settlement: ends a reservation, counts the actual units as used, and
-- corrects the rate rules (tokens by actual minus estimate; a request never
-- forwarded is given back). Once only: a reservation no longer held
-- (settled already, or lapsed and purged) changes nothing, so a settlement
-- replayed after a lost reply never counts twice.
--
-- KEYS[1] month hash, KEYS[2] day hash, KEYS[3] reservations ZSET,
-- KEYS[4] records HASH, KEYS[5..] one GCRA key per rule to correct.
-- ARGV[1] reservation id      ARGV[2] actual units
-- ARGV[3] month hash ttl ms   ARGV[4] day hash ttl ms
-- ARGV[5] GCRA level cap µs   ARGV[6] GCRA key ttl margin ms
-- ARGV[7..] per rule, the correction in µs (negative: a refund)
--
-- Returns 1 when it settled, 0 when the reservation was not held.

local month, day = KEYS[1], KEYS[2]
local units = tonumber(ARGV[2])
local level_cap, margin = tonumber(ARGV[5]), tonumber(ARGV[6])
local now = now_us()

if redis.call('HEXISTS', KEYS[4], ARGV[1]) == 0 then
  return 0
end
release(KEYS[3], KEYS[4], ARGV[1])
if units > 0 then
  redis.call('HINCRBY', month, 'used', int(units))
  redis.call('HINCRBY', day, 'used', int(units))
  redis.call('PEXPIRE', month, ARGV[3])
  redis.call('PEXPIRE', day, ARGV[4])
end

-- Corrections move the TAT from max(tat, now), never below now (a refund
-- banks nothing beyond a full rule) and are never refused: the tokens
-- were spent.
for i = 5, #KEYS do
  local delta = tonumber(ARGV[2 + i])
  if delta ~= 0 then
    local key = KEYS[i]
    local stored = tonumber(redis.call('GET', key)) or now
    local level = math.max(stored - now, 0) + delta
    level = math.min(math.max(level, 0), level_cap)
    if level > 0 then
      redis.call('SET', key, int(now + level), 'PX', math.ceil(level / 1000) + margin)
    else
      redis.call('DEL', key)
    end
  end
end
return 1
