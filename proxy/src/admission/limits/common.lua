-- Shared by admit.lua, settle.lua and state.lua: redis.rs prepends this
-- file to each of them.
--
-- Quota keys of one account (all under its hash tag, so in one slot):
--   month / day hash   fields `used` and `reserved`, in units
--   reservations ZSET  member = reservation id, score = expiry (ms)
--   records HASH       reservation id -> JSON {u = units, m = month key,
--                      d = day key}: what to give back when it ends

-- Redis server time in microseconds: every instance shares this clock.
local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

-- An integer as Redis should store it (tostring would print 1.7e+15).
local function int(n)
  return string.format('%.0f', n)
end

-- A hash's `used` and `reserved` (a missing hash is all zeros).
local function counters(key)
  local v = redis.call('HMGET', key, 'used', 'reserved')
  return tonumber(v[1]) or 0, tonumber(v[2]) or 0
end

-- Gives `units` reserved in a period back. A hash that has expired since
-- is not recreated, and a counter never goes below zero.
local function unreserve(key, units)
  if units > 0 and redis.call('EXISTS', key) == 1 then
    if redis.call('HINCRBY', key, 'reserved', -units) < 0 then
      redis.call('HSET', key, 'reserved', 0)
    end
  end
end

-- Ends one reservation. Only a reservation still in the ZSET gives its
-- units back, so one that lapsed and was purged is never given back twice.
local function release(reservations, records, id)
  local live = redis.call('ZREM', reservations, id) == 1
  local record = redis.call('HGET', records, id)
  if record then
    redis.call('HDEL', records, id)
    if live then
      local r = cjson.decode(record)
      local units = tonumber(r.u)
      unreserve(r.m, units)
      unreserve(r.d, units)
    end
  end
end

-- Ends every reservation whose ttl has passed: its request's instance died
-- or lost track of it. Each is purged once, so this is amortised O(1).
local function purge(reservations, records, now_ms)
  local lapsed = redis.call('ZRANGEBYSCORE', reservations, '-inf', now_ms)
  for _, id in ipairs(lapsed) do
    release(reservations, records, id)
  end
end
