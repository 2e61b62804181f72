"""Generate completions from a Llama-family model, each prompt with its own adapter (or none).

    python -m experiments.generate --model PATH_OR_HUB_ID \\
        --adapter math=runs/math/adapter --adapter chat=peft_dir \\
        --prompt "2+2=" --use math --prompt "Hello" --use chat --prompt "Base model here" \\
        [--max_new_tokens 32] [--temperature 0] [--top_p 1] [--seed 0]

`--use NAME` applies to the `--prompt` just before it; a prompt without one runs on the base.
An adapter DIR is a PEFT adapter (has adapter_config.json) or one saved by our training
(has adapter.json). The model directory needs a tokenizer.json. Bad input prints one
`error: ...` line and exits 1.
"""

from __future__ import annotations

import argparse
import os
import sys

from lora_jax.errors import LoraError


class _Prompt(argparse.Action):
    """Keeps prompts and their --use in one ordered list of [text, adapter name or None]."""

    def __call__(self, parser, ns, value, option_string=None):
        rows = getattr(ns, "rows", None) or []
        if option_string == "--prompt":
            rows.append([value, None])
        elif not rows or rows[-1][1] is not None:
            raise LoraError(f"--use {value} must follow a --prompt (one --use per prompt)")
        else:
            rows[-1][1] = value
        ns.rows = rows


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit 1, like every other bad input
        raise LoraError(message)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = _Parser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="HF model directory or hub id")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR")
    p.add_argument("--prompt", action=_Prompt, dest="rows", metavar="TEXT")
    p.add_argument("--use", action=_Prompt, dest="rows", metavar="NAME")
    p.add_argument("--max_new_tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def _load_adapter(directory: str, model):
    if os.path.isfile(os.path.join(directory, "adapter_config.json")):
        from lora_jax.peft import load_adapter
        return load_adapter(directory, model)
    if os.path.isfile(os.path.join(directory, "adapter.json")):
        from lora_jax.adapter_io import load_adapter
        return load_adapter(directory)[0]
    raise LoraError(f"{directory} holds no adapter (expected adapter_config.json or adapter.json)")


def run(args: argparse.Namespace) -> list[str]:
    """The completions, one per prompt, in order."""
    import lora_jax.models as M
    from lora_jax.adapter_io import read_info
    from lora_jax.generate import generate

    rows = args.rows or []
    if not rows:
        raise LoraError("give at least one --prompt")
    dirs = {}
    for item in args.adapter:
        name, sep, directory = item.partition("=")
        if not sep or not name or not directory:
            raise LoraError(f"--adapter {item!r}: expected NAME=DIR")
        if not os.path.isdir(directory):
            raise LoraError(f"adapter '{name}': no directory at {directory}")
        dirs[name] = directory
    unknown = sorted({u for _, u in rows if u is not None} - set(dirs))
    if unknown:
        raise LoraError(f"--use {unknown[0]}: no such adapter (given: {', '.join(dirs) or 'none'})")
    scanned = any(M.is_stacked(path) for d in dirs.values()
                  if os.path.isfile(os.path.join(d, "adapter.json"))
                  for path in read_info(d)["layout"])
    model = M.load(args.model, scan_layers=scanned)
    if model.tokenizer is None:
        raise LoraError(f"{model.source} has no tokenizer.json")
    names = list(dirs)
    adapters = [_load_adapter(dirs[n], model) for n in names]
    prompts = [model.tokenizer.encode(text).ids for text, _ in rows]
    index = [names.index(u) if u is not None else -1 for _, u in rows]
    out = generate(model, prompts, adapters=adapters, adapter_index=index if adapters else None,
                   max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_p=args.top_p, seed=args.seed)
    return [model.tokenizer.decode(ids, skip_special_tokens=True) for ids in out]


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parse(argv)
        completions = run(args)
    except LoraError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for (text, use), completion in zip(args.rows, completions, strict=True):
        print(f"### [{use or 'base'}] {text!r}")
        print(completion)
    return 0


if __name__ == "__main__":
    sys.exit(main())
