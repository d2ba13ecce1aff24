"""Run one offline vLLM engine on a checkpoint and write the greedy tokens as JSON (launched by the tests).

Run as a subprocess with a timeout, so a hung engine cannot hang pytest::

    python tests/vllm_plugin/engine_worker.py --model DIR --prompts '[[0, 5, 9]]' --max-tokens 8 --out out.json

The JSON holds ``{"tokens": [[...], ...]}`` (one list of generated ids per prompt). On failure the exception
goes to stderr and the exit status is 1; the process always ends with ``os._exit`` because vLLM's child
processes can keep the interpreter alive.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint directory")
    parser.add_argument("--prompts", required=True, help="JSON list of prompts, each a list of token ids")
    parser.add_argument("--max-tokens", type=int, default=8, help="tokens to generate per prompt")
    parser.add_argument("--out", required=True, help="where to write the JSON result")
    parser.add_argument("--load-format", default="auto", help="vLLM --load-format (auto, dummy)")
    parser.add_argument("--quantization", default=None, help="vLLM --quantization (default: from config.json)")
    parser.add_argument("--attention-backend", default=None, help="vLLM --attention-backend (e.g. CPU_MLA)")
    parser.add_argument("--tensor-parallel-size", type=int, default=1, help="vLLM --tensor-parallel-size")
    parser.add_argument("--enable-expert-parallel", action="store_true", help="vLLM --enable-expert-parallel")
    parser.add_argument("--enforce-eager", action="store_true", help="skip torch.compile / graph capture")
    parser.add_argument("--dtype", default="float32", help="model dtype (the CPU build runs float32 only)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=None, help="vLLM GPU memory fraction")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(
        model=args.model,
        dtype=args.dtype,
        load_format=args.load_format,
        quantization=args.quantization,
        enforce_eager=args.enforce_eager,
        attention_backend=args.attention_backend,
        tensor_parallel_size=args.tensor_parallel_size,
        enable_expert_parallel=args.enable_expert_parallel,
        max_model_len=256,
        max_num_seqs=8,
        seed=0,
        **({} if args.gpu_memory_utilization is None else {"gpu_memory_utilization": args.gpu_memory_utilization}),
    )
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in json.loads(args.prompts)]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    tokens = [list(out.outputs[0].token_ids) for out in outputs]
    with open(args.out, "w") as f:
        json.dump({"tokens": tokens}, f)
    return 0


if __name__ == "__main__":
    try:
        status = main()
    except BaseException:
        traceback.print_exc()
        status = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
