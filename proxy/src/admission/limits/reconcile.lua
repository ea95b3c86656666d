-- Reconciliation: raises `used` of a month and a day to the usage log's
-- totals when they are behind (a settlement that never reached Redis),
-- never lowers it (settlements the log has not written yet).
--
-- KEYS[1] month hash, KEYS[2] day hash.
-- ARGV[1] month total, ARGV[2] day total, ARGV[3] month ttl ms,
-- ARGV[4] day ttl ms.

local function raise(key, total, ttl)
  local used = tonumber(redis.call('HGET', key, 'used')) or 0
  if total > used then
    redis.call('HSET', key, 'used', string.format('%.0f', total))
    redis.call('PEXPIRE', key, ttl)
  end
end

raise(KEYS[1], tonumber(ARGV[1]), ARGV[3])
raise(KEYS[2], tonumber(ARGV[2]), ARGV[4])
return 0
