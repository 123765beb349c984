-- Lease the deliveries of one subscriber that are due: move each one's score in the
-- due zset to the lease's end, so no other forwarder takes it while it is in flight.
-- A forwarder killed mid-delivery leaves the lease to run out: the delivery is then
-- due again and another attempt (at least once) goes out.
-- KEYS: due zset, body hash, meta hash, age zset
-- ARGV: now, lease until, max count
-- Returns {id, body, meta or false, queued at, ...} for each leased delivery, then the
-- earliest score left in the due zset (or false).
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
local out = {}
for _, id in ipairs(ids) do
  local body = redis.call('HGET', KEYS[2], id)
  if body then
    redis.call('ZADD', KEYS[1], ARGV[2], id)
    local queued = redis.call('ZSCORE', KEYS[4], id)
    table.insert(out, id)
    table.insert(out, body)
    table.insert(out, redis.call('HGET', KEYS[3], id))
    table.insert(out, queued or ARGV[1])
  else
    -- Its body is gone (purged with its subscriber): nothing left to deliver.
    redis.call('ZREM', KEYS[1], id)
    redis.call('ZREM', KEYS[4], id)
    redis.call('HDEL', KEYS[3], id)
  end
end
local nxt = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
table.insert(out, nxt[2] or false)
return out
