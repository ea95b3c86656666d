-- Admission: checks quota, concurrency and rate rules, and only when all
-- pass charges the rules and reserves. A refusal writes nothing (the purge
-- of lapsed reservations aside, which changes no count that matters).
--
-- KEYS[1] month hash, KEYS[2] day hash, KEYS[3] reservations ZSET,
-- KEYS[4] records HASH, KEYS[5..] one GCRA key (holding the TAT in µs) per
-- rate rule, in the request's order.
-- ARGV[1] reservation id      ARGV[2] estimated units
-- ARGV[3] month cap, ARGV[4] day cap, ARGV[5] max concurrent (-1: none)
-- ARGV[6] reservation ttl ms  ARGV[7] month hash ttl ms
-- ARGV[8] day hash ttl ms     ARGV[9] GCRA burst tolerance µs
-- ARGV[10] GCRA level cap µs  ARGV[11] GCRA key ttl margin ms
-- ARGV[12] least units a capped quota may grant
-- ARGV[13] 1: a dry run, which checks and writes nothing
-- ARGV[14..] per rate rule, what this request costs it in µs
--
-- Returns {status, failed rule (0-based) or units granted, retry after µs,
-- levels...}: status 0 admitted (units granted, levels after charging),
-- 1 rate limited (levels as they stand), 2 concurrency, 3 month quota,
-- 4 day quota, 5 a capped quota whose month is not primed: Redis lost the
-- account's counters (or never had them), restore.lua must run first.

local month, day, reservations, records = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local id = ARGV[1]
local units = tonumber(ARGV[2])
local month_cap, day_cap = tonumber(ARGV[3]), tonumber(ARGV[4])
local max_concurrent = tonumber(ARGV[5])
local burst, level_cap = tonumber(ARGV[9]), tonumber(ARGV[10])

local now = now_us()
local now_ms = math.floor(now / 1000)
purge(reservations, records, now_ms)

-- A cap is only as good as the counters: refuse to decide one on counters
-- Redis may have lost.
if (month_cap >= 0 or day_cap >= 0) and redis.call('HEXISTS', month, 'primed') == 0 then
  return {5, 0, 0}
end

-- Quota: month (hard cap only), then day, then requests in progress. A
-- capped quota grants the room left under it, refused below the minimum.
local min_units = math.max(tonumber(ARGV[12]), 1)
local caps = {{month, month_cap, 3}, {day, day_cap, 4}}
for _, c in ipairs(caps) do
  if c[2] >= 0 then
    local used, reserved = counters(c[1])
    local room = c[2] - used - reserved
    if room < min_units then
      return {c[3], 0, 0}
    end
    units = math.min(units, room)
  end
end
if max_concurrent >= 0 and redis.call('ZCARD', reservations) >= max_concurrent then
  return {2, 0, 0}
end

-- Rate rules in order. The first that would pass its burst is reported;
-- a rule that shares its key with an earlier one sees that one's charge.
local rules = #KEYS - 4
local before, after, pending = {}, {}, {}
local failed, retry_after = -1, 0
for i = 1, rules do
  local key = KEYS[4 + i]
  local stored = tonumber(redis.call('GET', key)) or now
  before[i] = math.max(stored - now, 0)
  local tat = math.max(pending[key] or stored, now)
  local level = math.min(tat - now + tonumber(ARGV[13 + i]), level_cap)
  after[i] = level
  if level > burst then
    if failed < 0 then
      failed, retry_after = i - 1, level - burst
    end
  else
    pending[key] = now + level
  end
end
if failed >= 0 then
  local reply = {1, failed, retry_after}
  for i = 1, rules do reply[3 + i] = before[i] end
  return reply
end
if ARGV[13] == '1' then
  local reply = {0, 0, 0}
  for i = 1, rules do reply[3 + i] = before[i] end
  return reply
end

-- All conform: charge each rule (in order, each key once, with its last
-- TAT). A GCRA key expires when its rule is full again, plus a margin
-- for clock steps.
local margin = tonumber(ARGV[11])
for i = 1, rules do
  local key = KEYS[4 + i]
  local tat = pending[key]
  if tat then
    pending[key] = nil
    if tat > now then
      redis.call('SET', key, int(tat), 'PX', math.ceil((tat - now) / 1000) + margin)
    end
  end
end

-- Reserve. An id admitted twice replaces its reservation, not holds two.
release(reservations, records, id)
if units > 0 then
  redis.call('HINCRBY', month, 'reserved', int(units))
  redis.call('HINCRBY', day, 'reserved', int(units))
  redis.call('PEXPIRE', month, ARGV[7])
  redis.call('PEXPIRE', day, ARGV[8])
end
redis.call('ZADD', reservations, int(now_ms + tonumber(ARGV[6])), id)
redis.call('HSET', records, id, cjson.encode({u = int(units), m = month, d = day}))
-- The reservation structures outlive every period hash they point into
-- (the month's ttl, refreshed here): were they to expire first, lapsed
-- reservations could never be given back.
redis.call('PEXPIRE', reservations, ARGV[7])
redis.call('PEXPIRE', records, ARGV[7])

local reply = {0, units, 0}
for i = 1, rules do reply[3 + i] = after[i] end
return reply
