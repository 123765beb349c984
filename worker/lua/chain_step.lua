-- Chains of edits, advanced inside the transition that ends one of their steps
-- (store.py puts this file in front of transition.lua: one script, one atomic move).
--
-- A chain (kq:chain:{id}, see worker/chains.py) holds `steps`: a JSON list, one entry per
-- step, each a list of variants {"request": "<request JSON text>"}; more than one variant
-- fans the branch out. A later step's request text holds PREVIOUS (chains.PREVIOUS_OUTPUT)
-- where the previous step's output goes; it is replaced as text, so nothing in the
-- request is decoded and re-encoded (cjson would round numbers). When a step completes,
-- the next step's job(s) are written here, queued, with ids derived from (chain, branch,
-- step): a move that is retried or replayed can never write a step twice, and no worker
-- has to wait for it.
-- When a branch ends (last step done, a step failed or cancelled, or the chain is being
-- cancelled) its end is recorded; the last branch to end appends the chain's one event.

local function json_str(value)
  return cjson.encode(value or '')
end

local PREVIOUS = '"https://previous-step.invalid/output"'

-- Write one spawned step job, queued, exactly like create_jobs.lua writes a new one.
local function chain_spawn(c, step_no, branch, variant, image)
  local text = variant.request
  local from, to = string.find(text, PREVIOUS, 1, true)
  local request = string.sub(text, 1, from - 1) .. cjson.encode(image) .. string.sub(text, to + 1)
  local id = string.sub(redis.sha1hex('kq-chain:' .. c.chain_id .. ':' .. branch .. ':'
    .. step_no), 1, 32)
  local key = c.JOBP .. id
  if redis.call('EXISTS', key) == 1 then return nil end
  redis.call('HSET', key, 'id', id, 'state', 'queued', 'version', 1,
    'request', request, 'idempotency_key', '', 'priority', c.priority,
    'batch_id', c.batch_id, 'attempts', 0, 'created_at', c.now, 'updated_at', c.now,
    'chain_id', c.chain_id, 'step', step_no, 'branch', branch)
  if c.metadata ~= '' then redis.call('HSET', key, 'metadata', c.metadata) end
  redis.call('ZADD', c.poll, 'NX', c.spawn_check, id)
  redis.call('HINCRBY', c.stats, 'now:queued', 1)
  if c.batch_id ~= '' then
    redis.call('HINCRBY', c.BATCH .. c.batch_id, 'total', 1)
    redis.call('HINCRBY', c.BATCH .. c.batch_id, 'now:queued', 1)
    redis.call('RPUSH', c.BATCH_JOBS .. c.batch_id, id)
  end
  redis.call('RPUSH', c.CHAIN_JOBS .. c.chain_id, id)
  return id
end

-- Every variant of a later step holds the placeholder its input goes in.
local function chain_templates_ok(variants)
  for _, variant in ipairs(variants) do
    if type(variant.request) ~= 'string'
        or not string.find(variant.request, PREVIOUS, 1, true) then
      return false
    end
  end
  return true
end

-- The chain's one event for this run, once its last open branch has ended.
local function chain_finish(c, ck, nsteps)
  local ends = redis.call('HGETALL', c.CHAIN_ENDS .. c.chain_id)
  local branches, by_branch = {}, {}
  for i = 1, #ends, 2 do
    table.insert(branches, ends[i])
    by_branch[ends[i]] = cjson.decode(ends[i + 1])
  end
  table.sort(branches)
  local results, outputs = {}, {}
  local state, failed_step, reason, err = 'completed', '', '', ''
  for _, b in ipairs(branches) do
    local e = by_branch[b]
    table.insert(results, redis.call('HGET', c.CHAIN_ENDS .. c.chain_id, b))
    if e.state == 'completed' then
      if #e.outputs > 0 then table.insert(outputs, string.sub(cjson.encode(e.outputs), 2, -2)) end
    elseif e.state == 'failed' then
      if state ~= 'failed' or e.step < tonumber(failed_step) then
        failed_step, reason, err = tostring(e.step), e.reason, e.error
      end
      state = 'failed'
    elseif e.state == 'cancelled' and state == 'completed' then
      state = 'cancelled'
    end
  end
  if state == 'cancelled' then reason = 'cancelled_by_user' end
  local f = redis.call('HMGET', ck, 'batch_id', 'created_at', 'run', 'idempotency_key',
    'metadata')
  local event = {'schema', '2', 'type', 'chain', 'chain_id', c.chain_id, 'batch_id', f[1] or '',
    'state', state, 'run', f[3] or '1', 'steps', tostring(nsteps),
    'branches', tostring(#branches), 'outputs', '[' .. table.concat(outputs, ',') .. ']',
    'results', '[' .. table.concat(results, ',') .. ']', 'failed_step', failed_step,
    'reason', reason, 'error', err, 'created_at', f[2] or '', 'finished_at', c.now}
  if f[4] and f[4] ~= '' then
    table.insert(event, 'idempotency_key'); table.insert(event, f[4])
  end
  if f[5] and f[5] ~= '' then
    table.insert(event, 'metadata'); table.insert(event, f[5])
  end
  local event_id = redis.call('XADD', c.events, 'MAXLEN', '~', c.maxlen, '*', unpack(event))
  redis.call('HSET', ck, 'state', state, 'finished_at', c.now, 'event_id', event_id)
  redis.call('HINCRBY', c.stats, 'chain:' .. state, 1)
  for _, key in ipairs({ck, c.CHAIN_JOBS .. c.chain_id, c.CHAIN_ENDS .. c.chain_id}) do
    redis.call('EXPIRE', key, c.ttl)
  end
end

-- Called with the job already moved to its terminal state `c.target`. Returns the ids of
-- the step jobs it wrote (to be sent to the submit queue), or an empty list.
local function chain_advance(c)
  local ck = c.CHAIN .. c.chain_id
  local steps_json = redis.call('HGET', ck, 'steps')
  if not steps_json then return {} end  -- the chain's record is gone (expired): nothing to do
  local steps = cjson.decode(steps_json)
  local step_no = tonumber(redis.call('HGET', c.job, 'step') or '1')
  local branch = redis.call('HGET', c.job, 'branch') or '1'
  local cancelling = redis.call('HGET', ck, 'cancel') == '1'
  local outputs_json = redis.call('HGET', c.job, 'outputs') or '[]'
  local ending, reason, err = c.target, redis.call('HGET', c.job, 'reason') or '',
    redis.call('HGET', c.job, 'error') or ''
  if c.target == 'completed' and step_no < #steps then
    local first = cjson.decode(outputs_json)[1]
    if cancelling then
      ending, reason, err = 'cancelled', 'cancelled_by_user', 'the chain was cancelled'
    elseif type(first) ~= 'string' then
      ending, reason, err = 'failed', 'no_output', 'the step completed without an output image'
    elseif not chain_templates_ok(steps[step_no + 1]) then
      -- Only a record written around worker/chains.py gets here: end, never guess.
      ending, reason, err = 'failed', 'invalid_request', 'the next step has no input to fill'
    else
      local variants = steps[step_no + 1]
      local spawned = {}
      for i, variant in ipairs(variants) do
        local sub = branch
        if #variants > 1 then sub = branch .. '.' .. i end
        local id = chain_spawn(c, step_no + 1, sub, variant, first)
        if id then table.insert(spawned, id) end
      end
      if #variants > 1 then redis.call('HINCRBY', ck, 'open', #variants - 1) end
      return spawned
    end
  end
  if ending ~= 'completed' then outputs_json = '[]' end
  local record = '{"branch":' .. json_str(branch) .. ',"state":' .. json_str(ending)
    .. ',"step":' .. step_no .. ',"job_id":' .. json_str(c.job_id) .. ',"outputs":'
    .. outputs_json .. ',"reason":' .. json_str(reason) .. ',"error":' .. json_str(err) .. '}'
  redis.call('HSET', c.CHAIN_ENDS .. c.chain_id, branch, record)
  if redis.call('HINCRBY', ck, 'open', -1) <= 0 then chain_finish(c, ck, #steps) end
  return {}
end
