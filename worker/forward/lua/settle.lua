-- Record one delivery attempt's end, only if the delivery is still queued (it may have
-- been delivered by another forwarder whose lease overlapped, or dropped with its
-- subscriber): 'done' removes it, 'retry' schedules the next attempt, 'dead' parks it.
-- KEYS: due zset, age zset, body hash, meta hash, dead zset
-- ARGV: event id, mode, next attempt at (retry) or now (dead), meta JSON
-- Returns 1 if it was recorded, 0 if the delivery was no longer queued.
local id = ARGV[1]
if not redis.call('ZSCORE', KEYS[1], id) then
  if ARGV[2] == 'done' then
    -- Delivered after all (e.g. replayed while a late attempt was in flight).
    redis.call('ZREM', KEYS[5], id)
  end
  return 0
end
if ARGV[2] == 'done' then
  redis.call('ZREM', KEYS[1], id)
  redis.call('ZREM', KEYS[2], id)
  redis.call('HDEL', KEYS[3], id)
  redis.call('HDEL', KEYS[4], id)
  return 1
end
redis.call('HSET', KEYS[4], id, ARGV[4])
if ARGV[2] == 'retry' then
  redis.call('ZADD', KEYS[1], ARGV[3], id)
else
  redis.call('ZREM', KEYS[1], id)
  redis.call('ZREM', KEYS[2], id)
  redis.call('ZADD', KEYS[5], ARGV[3], id)
end
return 1
