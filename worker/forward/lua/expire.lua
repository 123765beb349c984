-- Park the deliveries whose retry window is over but that no attempt settled (their
-- endpoint's circuit breaker kept them waiting). Leased ones (in flight) are left to
-- their attempt.
-- KEYS: due zset, age zset, meta hash, dead zset
-- ARGV: queued-before cutoff, now, max count, error text
-- Returns how many were parked.
local ids = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
local parked = 0
for _, id in ipairs(ids) do
  local due = redis.call('ZSCORE', KEYS[1], id)
  if not due then
    redis.call('ZREM', KEYS[2], id)
  elseif tonumber(due) <= tonumber(ARGV[2]) then
    local raw = redis.call('HGET', KEYS[3], id)
    local meta = raw and cjson.decode(raw) or {}
    local last = meta['err']
    if type(last) == 'string' and last ~= '' then
      meta['err'] = ARGV[4] .. '; last error: ' .. last
    else
      meta['err'] = ARGV[4]
    end
    meta['at'] = tonumber(ARGV[2])
    redis.call('HSET', KEYS[3], id, cjson.encode(meta))
    redis.call('ZREM', KEYS[1], id)
    redis.call('ZREM', KEYS[2], id)
    redis.call('ZADD', KEYS[4], ARGV[2], id)
    parked = parked + 1
  end
end
return parked
