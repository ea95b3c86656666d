-- wrk script: POST a small chat completion (used by scripts/bench-gpu-sim.sh).
-- STREAM=1 in the environment asks for a streamed answer.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local stream = os.getenv("STREAM") == "1"
wrk.body = '{"model":"sim-model","messages":[{"role":"user","content":"Say hello in a few words."}],'
    .. '"max_tokens":16,"stream":' .. tostring(stream) .. '}'
