"""clip_benchmark on an `aclip.export` folder gives aclip's own zero-shot figure: the check, runnable.

    pip install clip_benchmark
    python -m analysis.clip_benchmark_check logs/train/runs/<timestamp> [--model online]

Writes the built-in held-out zero-shot set (`eval=[synthetic]`, at the model's image size) in
clip_benchmark's webdataset layout (`--dataset wds/<name> --dataset_root <dir>`: `test/0.tar` of PNG
images and class indices, `test/nshards.txt`, `classnames.txt`, `zeroshot_classification_templates.txt`),
exports the model with `python -m aclip.export`, runs `clip_benchmark eval` on the export in fp32
(`--no_amp`) and `evaluate.py` on the checkpoint, and prints both top-1 figures. Everything goes to
`--work` (default: a `clip_benchmark_check` folder beside the run).
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tarfile
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from aclip.datamodules.synthetic import SyntheticClassification
from aclip.trained import load_trained

REPOSITORY = Path(__file__).resolve().parents[1]

# clip_benchmark 1.6.2's `accuracy` calls float() on a one-element array, an error from NumPy 2.4 on;
# the same count, as a Python float, in its place.
_RUN_CLIP_BENCHMARK = """
import sys
import clip_benchmark.metrics.zeroshot_classification as zeroshot
from clip_benchmark.cli import main

def accuracy(output, target, topk=(1,)):
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [float(correct[:k].reshape(-1).float().sum()) / len(target) for k in topk]

zeroshot.accuracy = accuracy
sys.argv = ["clip_benchmark", *sys.argv[1:]]
sys.exit(main())
"""


def write_wds_layout(dataset: SyntheticClassification, root: Path) -> None:
    """`dataset` as clip_benchmark's `wds/` zero-shot classification layout under `root`."""
    (root / "test").mkdir(parents=True, exist_ok=True)
    (root / "test" / "nshards.txt").write_text("1\n")
    (root / "classnames.txt").write_text("\n".join(dataset.classnames) + "\n")
    templates = (template.replace("{}", "{c}") for template in dataset.templates)
    (root / "zeroshot_classification_templates.txt").write_text("\n".join(templates) + "\n")
    with tarfile.open(root / "test" / "0.tar", "w") as shard:
        for index in range(len(dataset)):
            pixels, label = dataset[index]
            image = io.BytesIO()
            Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(image, "PNG")  # lossless
            for suffix, payload in (("png", image.getvalue()), ("cls", str(label).encode())):
                member = tarfile.TarInfo(f"{index:06d}.{suffix}")
                member.size = len(payload)
                shard.addfile(member, io.BytesIO(payload))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.clip_benchmark_check", description=__doc__)
    parser.add_argument("run", type=Path, help="a run directory or .ckpt of the built-in data")
    parser.add_argument("--model", choices=["ema", "online"], default="ema")
    parser.add_argument("--work", type=Path, help="where to write (default: <run>/clip_benchmark_check)")
    args = parser.parse_args(argv)
    run = args.run if args.run.is_dir() else args.run.parents[1]
    work = args.work or run / "clip_benchmark_check"
    module, _ = load_trained(args.run)
    size = module.hparams.vision["image_size"]
    write_wds_layout(SyntheticClassification(size=960, image_size=size, seed=0), work / "wds")

    python = [sys.executable]
    export = [*python, "-m", "aclip.export", str(args.run), str(work / "export"), "--model", args.model]
    subprocess.run(export, check=True)
    benchmark = [
        *("eval", "--model", f"local-dir:{work / 'export'}", "--pretrained", "none"),
        *("--dataset", "wds/synthetic", "--dataset_root", str(work / "wds"), "--no_amp"),
        *("--batch_size", "64", "--num_workers", "0", "--output", str(work / "clip_benchmark.json")),
    ]
    subprocess.run([*python, "-c", _RUN_CLIP_BENCHMARK, *benchmark], check=True)
    theirs = json.loads((work / "clip_benchmark.json").read_text())["metrics"]["acc1"] * 100

    evaluate = [*python, "evaluate.py", f"ckpt_path={args.run}", "eval=[synthetic]"]
    subprocess.run([*evaluate, f"hydra.run.dir={work / 'evaluate'}"], check=True, cwd=REPOSITORY)
    ours = json.loads((work / "evaluate" / "metrics.json").read_text())[args.model]["zeroshot/synthetic/top1"]
    print(f"zero-shot top-1, {args.model} model: clip_benchmark {theirs:.2f} %, evaluate.py {ours:.2f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
