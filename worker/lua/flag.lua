-- Set flags on a job without moving it, as one compare-and-set (e.g. "ambiguous" on a
-- submit whose answer was lost): only while the job is in the given state and, if asked,
-- at the given version. The version moves on, so a caller that read the job before this
-- change loses its own compare-and-set instead of overwriting it.
-- KEYS[1] job hash   KEYS[2] poll schedule (zset)
-- ARGV[1] state the job must be in   ARGV[2] expected version or ''
-- ARGV[3] poll: '' keep, else the score to schedule at   ARGV[4] now
-- ARGV[5..] field, value pairs
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {'missing', '', '0'} end
local version = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
if state ~= ARGV[1] then return {'rejected', state, tostring(version)} end
if ARGV[2] ~= '' and tonumber(ARGV[2]) ~= version then
  return {'conflict', state, tostring(version)}
end
version = version + 1
redis.call('HSET', KEYS[1], 'version', version, 'updated_at', ARGV[4])
for i = 5, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
if ARGV[3] ~= '' then
  -- (A record written by create_jobs.lua has its id only in its key, after the last ':'.)
  local job_id = redis.call('HGET', KEYS[1], 'id') or string.match(KEYS[1], '[^:]*$')
  redis.call('ZADD', KEYS[2], tonumber(ARGV[3]), job_id)
end
return {'applied', state, tostring(version)}
