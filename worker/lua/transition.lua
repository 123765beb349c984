-- One atomic, forward-only move of a job (see JobStore.transition for the arguments).
-- KEYS[1] job hash      KEYS[2] events stream  KEYS[3] poll schedule (zset)
-- KEYS[4] stats hash    KEYS[5] dead letters   KEYS[6] admission slots  KEYS[7] admission claims
-- KEYS[8] waiter count  KEYS[9] wake list      KEYS[10] open submit attempts (zset)
-- KEYS[11] this webhook delivery's own dedupe key, as versions before the bucketed index
--          wrote it (read only; used when ARGV[11] is not '')
-- KEYS[12] latency histogram counters (hash; see the end of the terminal branch)
-- KEYS[13] outputs to copy out (zset; see worker/outputs/)
-- KEYS[14] admission's submits in the rate window (zset; see admission.lua)
-- ARGV[1] target state          ARGV[2] comma list of states it may come from
-- ARGV[3] expected version or '' ARGV[4] prediction id the job must have (or none) or ''
-- ARGV[5] now                    ARGV[6] record TTL once terminal (s)
-- ARGV[7] events MAXLEN (~)      ARGV[8] terminal: '1' or '0'
-- ARGV[9] poll: '' keep, 'rm' remove, else the score to schedule at
-- ARGV[10] '1': this attempt is known to have created no task (close it in KEYS[10])
-- ARGV[11] webhook dedupe TTL (s), or '' when the move does not come from a webhook
-- ARGV[12..15] key prefixes: prediction owner, batch counters, batch members, admission line
-- ARGV[16..19] key prefixes: job, chain, chain's jobs, chain's branch ends
-- ARGV[20] when a chain step written by this move gets its queued check (poll score)
-- ARGV[21] '1': completed jobs' outputs are copied out (queue them in KEYS[13])
-- ARGV[22] the webhook delivery's id ('' for none)  ARGV[23] key prefix: webhook-id marks
-- ARGV[24], ARGV[25] the webhook id's index shard and entry name ('' for none)
-- ARGV[26..28] a prediction id the move may index ('' for none), its shard and entry name
-- ARGV[29] this job's id as the prediction index stores it
-- ARGV[30..] field, value pairs to write with the move
--
-- Answer: {outcome, state, version} and, for an applied move, the ids of the chain step
-- jobs it wrote (chain_step.lua, in front of this file) as a 4th element, comma-separated.
--
-- With ARGV[11], a delivery counts as seen exactly when this call has applied it or found
-- it stale: the mark and the move happen together, or (on any error) neither does.
--
-- The prediction index (prediction id -> job id) and the webhook-id marks are entries of
-- hashes, each a bucket of one day (of the Redis server's clock) and one shard of the id,
-- rather than a key each: a key costs ~100 bytes more than an entry, for every finished
-- job, for as long as it lives. A bucket expires `ttl` after its day ends, so an entry
-- lives at least `ttl` after its last write; a look-up reads every bucket that may still
-- hold it, then the key of its own that versions before this one wrote.
-- An id of 32 hex digits (every prediction id) is an entry's name as its 16 bytes, and a
-- job id of 32 hex digits its value as a zero byte and its 16 bytes (index_job_id reads it).
-- INDEX_PERIOD_S and INDEX_SHARDS are worker.store's; tests/test_record_layout.py checks.
local INDEX_PERIOD_S, INDEX_SHARDS = 86400, 1024
local server_now = tonumber(redis.call('TIME')[1])
local function hex32_bytes(id)
  if #id == 32 and not string.find(id, '[^0-9a-f]') then
    return (string.gsub(id, '..', function(hex) return string.char(tonumber(hex, 16)) end))
  end
end
-- An id's shard and entry name, worked out once per id (a delivery's id is looked up,
-- then written); the caller works them out for the ids it knows (worker.store: cheaper
-- in its process than here, in the one thread every client of this Redis waits on).
local SHARDS, NAMES = {}, {}
if ARGV[24] ~= '' then SHARDS[ARGV[22]], NAMES[ARGV[22]] = ARGV[24], ARGV[25] end
if ARGV[26] ~= '' then SHARDS[ARGV[26]], NAMES[ARGV[26]] = ARGV[27], ARGV[28] end
local function index_shard(id)
  local shard = SHARDS[id]
  if not shard then
    shard = tostring(tonumber(string.sub(redis.sha1hex(id), 1, 3), 16) % INDEX_SHARDS)
    SHARDS[id] = shard
  end
  return shard
end
local function index_name(id)
  local name = NAMES[id]
  if not name then
    name = hex32_bytes(id) or id
    NAMES[id] = name
  end
  return name
end
local function index_job_id(value)
  if value and #value == 17 and string.byte(value, 1) == 0 then
    return (string.gsub(string.sub(value, 2), '.',
      function(c) return string.format('%02x', string.byte(c)) end))
  end
  return value
end
local function index_put(prefix, id, value, ttl)
  local period = math.floor(server_now / INDEX_PERIOD_S)
  local key = prefix .. period .. ':' .. index_shard(id)
  redis.call('HSET', key, index_name(id), value)
  redis.call('EXPIREAT', key, (period + 1) * INDEX_PERIOD_S + ttl)
end
local function index_get(prefix, id, ttl)
  local shard, name = index_shard(id), index_name(id)
  local newest = math.floor(server_now / INDEX_PERIOD_S)
  for period = newest, math.floor((server_now - ttl) / INDEX_PERIOD_S) - 1, -1 do
    local value = redis.call('HGET', prefix .. period .. ':' .. shard, name)
    if value then return value end
  end
  return redis.call('GET', prefix .. id)
end

local job = KEYS[1]
local dedupe = ARGV[11] ~= ''
local WHID = ARGV[23]
local function finish(outcome, state, version)
  if dedupe then index_put(WHID, ARGV[22], '1', tonumber(ARGV[11])) end
  return {outcome, state, tostring(version)}
end
if dedupe and index_get(WHID, ARGV[22], tonumber(ARGV[11])) then
  local seen = redis.call('HMGET', job, 'state', 'version')
  return {'duplicate', seen[1] or '', seen[2] or '0'}
end

local PRED, BATCH, BATCH_JOBS, ADM_WAIT = ARGV[12], ARGV[13], ARGV[14], ARGV[15]
local terminal = ARGV[8] == '1'
-- The job's fields this move reads, in one look-up: the first 7, and for a terminal move
-- its event's too. `after(name, i)` is field `name`'s (the i-th read) value once the move
-- has written its own (a field it removes reads as false, as HGET answers).
local HAD
if terminal then
  HAD = redis.call('HMGET', job, 'state', 'version', 'id', 'prediction_id', 'batch_id',
    'attempts', 'price_micros', 'outputs', 'error', 'reason', 'task_code', 'resolved_by',
    'created_at', 'submitted_at', 'finished_at', 'idempotency_key', 'metadata', 'chain_id',
    'step', 'branch', 'priority')
else
  HAD = redis.call('HMGET', job, 'state', 'version', 'id', 'prediction_id', 'batch_id',
    'attempts', 'price_micros')
end
local written = {}
local function after(name, i)
  local value = written[name]
  if value == nil then return HAD[i] end
  return value
end
local state = HAD[1]
if not state then return finish('missing', '', '0') end
local version = tonumber(HAD[2] or '0')

local allowed = false
for s in string.gmatch(ARGV[2], '[^,]+') do
  if s == state then allowed = true end
end
if not allowed then return finish('rejected', state, version) end
if ARGV[3] ~= '' and tonumber(ARGV[3]) ~= version then
  return {'conflict', state, tostring(version)}
end
-- Records written by create_jobs.lua keep their id only in their key (older ones, and
-- chain steps, also have an `id` field).
local job_id = HAD[3] or string.sub(job, #ARGV[16] + 1)
if ARGV[4] ~= '' then
  local pid = HAD[4]
  if pid and pid ~= '' and pid ~= ARGV[4] then return finish('mismatch', state, version) end
  if not pid or pid == '' then
    -- Adopting an id (a webhook for an ambiguous submit): it must not belong to another job.
    local owner = index_job_id(index_get(PRED, ARGV[4], tonumber(ARGV[6])))
    if owner and owner ~= job_id then return finish('mismatch', state, version) end
  end
end

local old_pid = HAD[4] or ''
local batch_id = HAD[5] or ''
local batch = BATCH .. batch_id
version = version + 1
-- A field at its default ('', or 0 for the flags below) is removed rather than written:
-- every reader takes a missing field as its default, and a finished record keeps only
-- what it says (its bytes stay for the record's whole TTL). The move's writes go out as
-- one HSET and one HDEL, each field's last value winning, as if written one by one.
local ZERO_IS_DEFAULT = {ambiguous = true, answer_lost_at = true}
local order = {'state', 'version', 'updated_at'}
written.state, written.version, written.updated_at = ARGV[1], tostring(version), ARGV[5]
local function put(name, value)  -- false: remove the field
  if written[name] == nil then order[#order + 1] = name end
  written[name] = value
end
for i = 30, #ARGV, 2 do
  local name, value = ARGV[i], ARGV[i + 1]
  if written[name] == nil then order[#order + 1] = name end
  if value == '' or (value == '0' and ZERO_IS_DEFAULT[name]) then
    written[name] = false
  else
    written[name] = value
  end
end
-- The job's price, as the move leaves it (a terminal move then drops it: below).
local price = tonumber(after('price_micros', 7) or '')

-- A terminal move appends the job's result event, from the record as the move leaves it
-- (`f`; docs/events.md), and writes its id with the move's other fields.
local f
if terminal then
  f = {after('batch_id', 5), after('prediction_id', 4), after('outputs', 8),
    after('error', 9), after('reason', 10), after('task_code', 11), after('resolved_by', 12),
    after('created_at', 13), after('submitted_at', 14), after('finished_at', 15),
    after('attempts', 6), after('idempotency_key', 16), after('metadata', 17),
    after('chain_id', 18), after('step', 19), after('branch', 20), after('priority', 21)}
  local event = {'schema', '2', 'type', 'job', 'job_id', job_id, 'batch_id', f[1] or '', 'state', ARGV[1],
    'prediction_id', f[2] or '', 'outputs', f[3] or '[]', 'error', f[4] or '',
    'reason', f[5] or '', 'task_code', f[6] or '', 'resolved_by', f[7] or '',
    'created_at', f[8] or '', 'submitted_at', f[9] or '', 'finished_at', f[10] or '',
    'attempts', f[11] or '0', 'version', tostring(version)}
  -- The producer's own key and metadata, and its place in a chain, when the job has them
  -- (docs/events.md).
  for i, name in ipairs({'idempotency_key', 'metadata', 'chain_id', 'step', 'branch'}) do
    local value = f[11 + i]
    if value and value ~= '' then
      table.insert(event, name)
      table.insert(event, value)
    end
  end
  put('event_id', redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[7], '*', unpack(event)))
  -- Bookkeeping a finished job no longer needs: its price was counted when its task was
  -- recorded (below, or never), its budget reservation is never made again (a finished
  -- job is not reserved for: reserve_budget.lua), and its last update is its finish
  -- (readers fall back to finished_at).
  put('price_micros', false)
  put('reserved', false)
  if f[10] == ARGV[5] then put('updated_at', false) end
end
local sets, removes = {}, {}
for _, name in ipairs(order) do
  local value = written[name]
  if value then
    sets[#sets + 1] = name
    sets[#sets + 1] = value
  else
    removes[#removes + 1] = name
  end
end
if #sets > 0 then redis.call('HSET', job, unpack(sets)) end
if #removes > 0 then redis.call('HDEL', job, unpack(removes)) end

-- Live gauges of jobs per non-terminal state (terminal totals are counted below).
redis.call('HINCRBY', KEYS[4], 'now:' .. state, -1)
if ARGV[8] ~= '1' then redis.call('HINCRBY', KEYS[4], 'now:' .. ARGV[1], 1) end
if batch_id ~= '' then
  redis.call('HINCRBY', batch, 'now:' .. state, -1)
  if ARGV[8] ~= '1' then redis.call('HINCRBY', batch, 'now:' .. ARGV[1], 1) end
end

-- Open submit attempts: from the moment a POST may go out until its task is known (the
-- job records a prediction id) or it is known that no task came of it. Reconciliation
-- through the list call adopts a task only when no other open attempt could own it.
local attempt = job_id .. ':' .. (after('attempts', 6) or '0')
if ARGV[1] == 'submitting' then redis.call('ZADD', KEYS[10], tonumber(ARGV[5]), attempt) end
if ARGV[10] == '1' then redis.call('ZREM', KEYS[10], attempt) end
if state == 'submitting' then
  -- The attempt's answer is in (or given up on): its submit counts in admission's rate
  -- window from now, when the provider has surely received it (admission.lua's take).
  -- Not an entry past the window (61 s, admission.lua's WINDOW): a move that long after
  -- the take (an ambiguous submit settled later) must not count it again.
  local now, taken = tonumber(ARGV[5]), tonumber(redis.call('ZSCORE', KEYS[14], attempt) or '')
  if taken and taken < now and taken > now - 61 then
    redis.call('ZADD', KEYS[14], now, attempt)
  end
end

local ttl = tonumber(ARGV[6])
local pid = after('prediction_id', 4) or ''
if pid ~= '' then
  index_put(PRED, pid, ARGV[29], ttl)
  if old_pid == '' then
    -- A task now exists at the provider for this job: that is what gets billed, at the
    -- price of the job's model (written with its submitting move).
    -- (`paid_priced` counts the tasks in `paid_micros`: a record without a price, written
    -- before prices rode on it, is costed at the mean price by its readers.)
    redis.call('HINCRBY', KEYS[4], 'paid', 1)
    if batch_id ~= '' then redis.call('HINCRBY', batch, 'paid', 1) end
    if price then
      redis.call('HINCRBY', KEYS[4], 'paid_micros', price)
      redis.call('HINCRBY', KEYS[4], 'paid_priced', 1)
      if batch_id ~= '' then
        redis.call('HINCRBY', batch, 'paid_micros', price)
        redis.call('HINCRBY', batch, 'paid_priced', 1)
      end
    end
    redis.call('ZREM', KEYS[10], attempt)
  end
end

-- Any move ends a dispatcher's claim on the job (admission.lua).
redis.call('ZREM', KEYS[7], job_id)
-- Back to queued, or finished: the job no longer occupies a provider slot (admission).
if ARGV[1] == 'queued' or ARGV[8] == '1' then
  -- Wake a dispatcher only when someone waits for the slot (saves a round trip per job).
  if redis.call('ZREM', KEYS[6], job_id) == 1
      and tonumber(redis.call('GET', KEYS[8]) or '0') > 0 then
    redis.call('LPUSH', KEYS[9], '1')
    redis.call('LTRIM', KEYS[9], 0, 63)
  end
end
if ARGV[8] == '1' and redis.call('ZREM', ADM_WAIT .. batch_id, job_id) == 1 then
  redis.call('DECR', KEYS[8])
end

if ARGV[9] == 'rm' then
  redis.call('ZREM', KEYS[3], job_id)
elseif ARGV[9] ~= '' then
  redis.call('ZADD', KEYS[3], tonumber(ARGV[9]), job_id)
end

if terminal then
  redis.call('EXPIRE', job, ttl)
  if ARGV[9] ~= 'rm' then redis.call('ZREM', KEYS[3], job_id) end  -- 'rm': done above
  redis.call('HINCRBY', KEYS[4], 'state:' .. ARGV[1], 1)
  if f[7] and f[7] ~= '' then
    redis.call('HINCRBY', KEYS[4], 'resolved_by:' .. f[7], 1)
  end
  if ARGV[1] == 'failed' then
    redis.call('ZADD', KEYS[5], tonumber(ARGV[5]), job_id)
    -- Entries outlive their records by nothing: drop those whose job has expired.
    redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', tonumber(ARGV[5]) - ttl)
  end
  if batch_id ~= '' then
    -- A batch's counters and member list live as long as its newest finished job.
    redis.call('EXPIRE', batch, ttl)
    redis.call('EXPIRE', BATCH_JOBS .. batch_id, ttl)
    redis.call('HINCRBY', batch, ARGV[1], 1)
    redis.call('HINCRBY', batch, 'terminal', 1)
    redis.call('HSET', batch, 'last_finished_at', ARGV[5])
    if f[7] and f[7] ~= '' then redis.call('HINCRBY', batch, 'by_' .. f[7], 1) end
  end
  -- Latency histograms (exported by worker.metrics), counted once per job, here, in the
  -- move that ends it: enqueue->result (created_at) and submit->result (submitted_at, if
  -- a task was ever recorded) up to finished_at. In KEYS[12], '<span>|<state>|<n>' counts
  -- the results in bucket n (the first bound >= the seconds; #BOUNDS + 1 above the last)
  -- and '<span>|<state>|sum' adds up the seconds. BOUNDS is
  -- worker.metrics.JOB_LATENCY_BUCKETS_S; tests/test_metrics.py checks they agree.
  local BOUNDS = {1, 2.5, 5, 10, 15, 20, 30, 45, 60, 90, 120, 180, 300, 600, 1800, 3600,
    7200, 21600, 86400}
  local done_at = tonumber(f[10] or '') or tonumber(ARGV[5])
  for _, span in ipairs({{'enqueue', f[8]}, {'submit', f[9]}}) do
    local from = tonumber(span[2] or '')
    if from and from > 0 then
      local seconds = math.max(0, done_at - from)
      local n = #BOUNDS + 1
      for i, bound in ipairs(BOUNDS) do
        if seconds <= bound then n = i; break end
      end
      local field = span[1] .. '|' .. ARGV[1] .. '|'
      redis.call('HINCRBY', KEYS[12], field .. n, 1)
      redis.call('HINCRBYFLOAT', KEYS[12], field .. 'sum', seconds)
    end
  end
end
local spawned = {}
if terminal then
  if ARGV[1] == 'completed' and ARGV[21] == '1' and (f[3] or '[]') ~= '[]' then
    redis.call('ZADD', KEYS[13], 'NX', tonumber(ARGV[5]), job_id)
  end
  local chain_id = f[14]
  if chain_id and chain_id ~= '' then
    spawned = chain_advance({job = job, job_id = job_id, target = ARGV[1], now = ARGV[5],
      ttl = ttl, maxlen = ARGV[7], chain_id = chain_id, events = KEYS[2], poll = KEYS[3],
      stats = KEYS[4], BATCH = BATCH, BATCH_JOBS = BATCH_JOBS, JOBP = ARGV[16],
      CHAIN = ARGV[17], CHAIN_JOBS = ARGV[18], CHAIN_ENDS = ARGV[19], spawn_check = ARGV[20],
      batch_id = batch_id, priority = f[17] or '0', metadata = f[13] or ''})
  end
end
local answer = finish('applied', ARGV[1], version)
table.insert(answer, table.concat(spawned, ','))
return answer
