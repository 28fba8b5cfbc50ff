"""vLLM side of experiments/bench_peers.py: runs in vLLM's OWN virtualenv (never imported by er_jax).

    /tmp/vllmvenv/bin/python experiments/vllm_worker.py --model /tmp/smollm2_hf --dtype float32

Loads the model once, then reads one JSON request per stdin line ({"prompts": [[ids]...], "n": 1,
"temperature": 0, "max_tokens": 64, "min_tokens": 64, "ignore_eos": true, "seed": 0}) and answers one JSON
line on stdout prefixed "RESULT " ({"wall_s", "tokens", "outputs": [[ids]...]}), timed around
`LLM.generate` only. Everything else vLLM prints goes to stderr.
"""
import argparse
import json
import os
import sys
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-model-len", type=int, default=1024)
    args = ap.parse_args()
    real_stdout = sys.stdout
    sys.stdout = sys.stderr  # vLLM's chatter must not mix with the protocol
    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model=args.model, dtype=args.dtype, max_model_len=args.max_model_len, seed=0)
    import vllm
    real_stdout.write("READY " + json.dumps({"load_s": time.perf_counter() - t0, "vllm": vllm.__version__,
                                             "bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND")}) + "\n")
    real_stdout.flush()
    for line in sys.stdin:
        req = json.loads(line)
        sp = SamplingParams(n=req.get("n", 1), temperature=req["temperature"], top_p=1.0, max_tokens=req["max_tokens"],
                            min_tokens=req.get("min_tokens", 0), ignore_eos=req.get("ignore_eos", False),
                            seed=req.get("seed"))
        prompts = [{"prompt_token_ids": p} for p in req["prompts"]]
        t0 = time.perf_counter()
        outs = llm.generate(prompts, sp, use_tqdm=False)
        wall = time.perf_counter() - t0
        toks = [list(c.token_ids) for o in outs for c in o.outputs]
        real_stdout.write("RESULT " + json.dumps({"wall_s": wall, "tokens": sum(map(len, toks)),
                                                  "outputs": toks}) + "\n")
        real_stdout.flush()


if __name__ == "__main__":
    main()
