"""Compile a random checkpoint of a real model's shape and report time and peak memory per stage.

    python benchmarks/scale.py --shape tinyllama-1.1b [--workdir DIR] [--keep-ratio 0.3]
                               [--calibration-samples 8] [--verify-samples 2] [--sequential]
                               [--checkpoint-only]

Writes a LLaVA checkpoint folder with random weights in bfloat16 (``model-NNNNN-of-NNNNN.safetensors``
shards of at most 2 GB, an index, the config, the small offline tokenizer and the processor),
one tensor at a time so that writing it needs no more memory than one shard. Then it runs
``quota-compile`` on a ``model.yaml`` naming that folder (QUOTA at ``--keep-ratio``, the
default W4A4 + INT4 KV cache, the default export targets) as a separate process and reads the
compile's own progress lines: the seconds and the peak resident memory (RSS) of each stage.
The process's peak RSS as the kernel counts it (``getrusage``) and the bundle's bytes on disk
are reported too; everything goes to ``DIR/scale-SHAPE.json``.

The checkpoint is written once and reused by later runs (``DIR/SHAPE/`` holds a marker file
when it is complete); the bundle is replaced (``--force``). Random weights: only times and
sizes mean anything. A compile that the kernel kills for memory is reported as such, with the
stages it finished.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHARD_BYTES = 2 * 1024**3
COMPLETE = ".complete"


@dataclass(frozen=True)
class Shape:
    """A LLaVA layout: a CLIP vision tower and a Llama decoder."""

    about: str
    vision: dict
    text: dict


# CLIP ViT-L/14 at 336 px: the tower of LLaVA-1.5 (576 visual tokens after dropping CLS).
CLIP_VIT_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=336, patch_size=14)

SHAPES: dict[str, Shape] = {
    # llava-hf/llava-1.5-7b-hf's config.json: Vicuna-7B (Llama-2) decoder, 32 x 4096 / 11008, MHA
    "llava-1.5-7b": Shape(
        "LLaVA-1.5-7B: CLIP ViT-L/14-336 + Llama 32 x 4096/11008, 32 heads, vocabulary 32,064",
        CLIP_VIT_L_336,
        dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, vocab_size=32064),
    ),
    # TinyLlama-1.1B's decoder (22 x 2048 / 5632, GQA 32 / 4) under the same tower
    "tinyllama-1.1b": Shape(
        "CLIP ViT-L/14-336 + TinyLlama-1.1B-shaped Llama 22 x 2048/5632, GQA 32/4, vocabulary 32,000",
        CLIP_VIT_L_336,
        dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4, vocab_size=32000),
    ),
    # small enough for a test of this script
    "smoke": Shape(
        "a 2-layer tower of width 64 at 56 px + an 8-layer decoder of width 128 (for tests)",
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=56, patch_size=14),
        dict(hidden_size=128, intermediate_size=256, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2, vocab_size=512),
    ),
}


def build_config(shape: Shape):
    """The ``LlavaConfig`` of a shape (bfloat16) and its processor (the small offline tokenizer)."""
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaProcessor

    from quota_compile.models.builtin import build_tokenizer

    tokenizer = build_tokenizer()
    vision = CLIPVisionConfig(**shape.vision)
    text = LlamaConfig(
        **shape.text,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.02,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    config.dtype = torch.bfloat16
    size = vision.image_size
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}),
        tokenizer=tokenizer,
        patch_size=vision.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token="<image>",
    )
    return config, processor


def parameter_inits(config) -> list[tuple[str, tuple[int, ...], str]]:
    """``(name, shape, init)`` of every parameter of the model the config describes, in state-dict
    order, found on the meta device (nothing allocated). ``init``: ``ones`` for norm scales,
    ``zeros`` for biases, ``head`` for the output head, ``normal`` otherwise."""
    import torch
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    inits = {}
    for module_name, module in model.named_modules():
        norm = isinstance(module, torch.nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")
        for pname, p in module.named_parameters(recurse=False):
            name = f"{module_name}.{pname}" if module_name else pname
            if pname == "bias":
                kind = "zeros"
            elif norm:
                kind = "ones"
            elif module is model.get_output_embeddings():
                kind = "head"
            else:
                kind = "normal"
            inits[name] = (tuple(p.shape), kind)
    return [(name, *inits[name]) for name in model.state_dict() if name in inits]


def random_tensor(name: str, shape: tuple[int, ...], init: str, seed: int):
    """One parameter, bfloat16, from its own seeded stream (the same for the same name and seed)."""
    import torch

    from quota_compile.models.builtin import LOGIT_GAIN

    if init == "ones":
        return torch.ones(shape, dtype=torch.bfloat16)
    if init == "zeros":
        return torch.zeros(shape, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    std = 0.02 * (LOGIT_GAIN if init == "head" else 1.0)
    return (torch.randn(shape, generator=g) * std).to(torch.bfloat16)


def write_checkpoint(shape_name: str, folder: Path, seed: int = 0) -> Path:
    """Write (or reuse) the random bfloat16 checkpoint folder of a shape; returns the folder."""
    from safetensors.torch import save_file

    if (folder / COMPLETE).is_file():
        print(f"checkpoint: reusing {folder}", file=sys.stderr)
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    config, processor = build_config(SHAPES[shape_name])
    params = parameter_inits(config)
    shards: list[list[tuple[str, tuple[int, ...], str]]] = [[]]
    size = total = 0
    for p in params:
        nbytes = 2 * math.prod(p[1])
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(p)
        size += nbytes
        total += nbytes
    print(f"checkpoint: {total / 2e6:,.1f} M parameters, {total / 1e9:.3f} GB in bfloat16, {len(shards)} shard(s) -> {folder}", file=sys.stderr)
    weight_map = {}
    t0 = time.perf_counter()
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({name: random_tensor(name, s, init, seed) for name, s, init in shard}, str(folder / file), metadata={"format": "pt"})
        weight_map.update({name: file for name, _, _ in shard})
        print(f"checkpoint: shard {i}/{len(shards)} written ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1) + "\n")
    config.save_pretrained(folder)
    processor.save_pretrained(folder)
    (folder / COMPLETE).write_text(f"{shape_name} seed {seed}\n")
    return folder


MODEL_YAML = """\
# benchmarks/scale.py: {about} (random weights, bfloat16)
version: 1
model:
  source: {checkpoint}
quantization:
  weights:
    group_size: 128
pruning:
  method: quota
  keep_ratio: {keep_ratio}
calibration:
  num_samples: {calibration_samples}
  sequential: {sequential}
verify:
  samples: {verify_samples}
output:
  dir: {out_dir}
  name: {name}
"""

STAGE_LINE = re.compile(r"^\[(\d+)/(\d+)\] (\w+)")
DONE_LINE = re.compile(r"done in ([\d.]+) s, peak memory ([\d.]+) (B|KiB|MiB|GiB|TiB)")
UNITS = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, "TiB": 1024**4}


def parse_progress(lines: list[str]) -> list[dict]:
    """The stages the compile's progress lines report: ``{stage, seconds, peak_rss_bytes}`` for each
    finished one, and ``{stage}`` alone for one that started and did not finish."""
    stages: list[dict] = []
    for line in lines:
        line = line.strip()
        if m := STAGE_LINE.match(line):
            stages.append({"stage": m.group(3)})
        elif (m := DONE_LINE.search(line)) and stages and "seconds" not in stages[-1]:
            stages[-1].update(seconds=float(m.group(1)), peak_rss_bytes=round(float(m.group(2)) * UNITS[m.group(3)]))
    return stages


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), required=True)
    ap.add_argument("--workdir", type=Path, default=Path("scale-work"), help="where the checkpoint, model.yaml, bundle and results go (default: ./scale-work)")
    ap.add_argument("--keep-ratio", type=float, default=0.3)
    ap.add_argument("--calibration-samples", type=int, default=8)
    ap.add_argument("--verify-samples", type=int, default=2)
    ap.add_argument("--sequential", action="store_true", help="calibration.sequential: true (layer-by-layer calibration)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    ap.add_argument("--checkpoint-only", action="store_true", help="write the checkpoint and stop")
    args = ap.parse_args()

    shape = SHAPES[args.shape]
    work = args.workdir.resolve()
    checkpoint = work / args.shape
    t0 = time.perf_counter()
    write_checkpoint(args.shape, checkpoint, args.seed)
    write_seconds = time.perf_counter() - t0
    checkpoint_bytes = sum(f.stat().st_size for f in checkpoint.glob("*.safetensors"))
    if args.checkpoint_only:
        return 0

    name = f"{args.shape}-quota"
    config = work / f"{args.shape}.yaml"
    config.write_text(
        MODEL_YAML.format(
            about=shape.about,
            checkpoint=checkpoint,
            keep_ratio=args.keep_ratio,
            calibration_samples=args.calibration_samples,
            sequential=str(args.sequential).lower(),
            verify_samples=args.verify_samples,
            out_dir=work / "exported",
            name=name,
        )
    )
    print(f"compile: quota-compile {config} --force", file=sys.stderr)
    lines: list[str] = []
    t1 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "quota_compile", "compile", str(config), "--force"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stderr.write(line)
        lines.append(line)
    rc = proc.wait()
    wall = time.perf_counter() - t1
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    bundle = work / "exported" / name
    result = {
        "shape": args.shape,
        "about": shape.about,
        "settings": {k: getattr(args, k) for k in ("keep_ratio", "calibration_samples", "verify_samples", "sequential", "seed")},
        "checkpoint_bytes": checkpoint_bytes,
        "checkpoint_write_seconds": round(write_seconds, 1),
        "exit_code": rc,
        "killed_by_signal": -rc if rc < 0 else None,
        "compile_seconds": round(wall, 1),
        "peak_rss_bytes": usage.ru_maxrss * 1024,  # Linux reports KiB
        "stages": parse_progress(lines),
        "bundle_bytes": folder_bytes(bundle) if rc == 0 and bundle.is_dir() else None,
        "bundle_weights_bytes": sum(f.stat().st_size for f in bundle.rglob("weights.bin")) if rc == 0 and bundle.is_dir() else None,
    }
    out = work / f"scale-{args.shape}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    gib = 1024**3
    print(f"\n{args.shape}: checkpoint {checkpoint_bytes / 1e9:.2f} GB; compile exit {rc}, {wall:.0f} s, peak RSS {result['peak_rss_bytes'] / gib:.1f} GiB")
    for s in result["stages"]:
        if "seconds" in s:
            print(f"  {s['stage']:<10} {s['seconds']:8.1f} s  {s['peak_rss_bytes'] / gib:6.1f} GiB")
        else:
            print(f"  {s['stage']:<10} (did not finish)")
    if result["bundle_bytes"] is not None:
        print(f"  bundle {result['bundle_bytes'] / 1e9:.2f} GB, of which weights.bin {result['bundle_weights_bytes'] / 1e9:.2f} GB")
    print(f"-> {out}")
    return 0 if rc == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
