"""Where one rank's time goes on a job of the sample's texts: when the rows reach the client, the rank's own
timings, and (with py-spy installed) the executor's hottest frames.

    HF_HUB_OFFLINE=1 python -m benchmarks.rank_profile [--device cuda] [--rows 5000] [--model bundled|empty]

--model empty: the bundled model's tokenizer and width with no layers, so compute is nearly free and what shows
is the rank's own plumbing (tokenising, padding, gathering, reporting).
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from transformers import AutoTokenizer, BertModel

from benchmarks.data_plane import tiny_encoder
from benchmarks.loops import load_texts, model_path, plain_loop
from distinfer.client.api import Client
from distinfer.client.local import LocalCluster

PROFILED_S = 10


def one_job(client: Client, texts: list[str], model: str) -> tuple[float, list[str], object]:
    started = time.perf_counter()
    job = client.submit(texts, model, dtype="float32")
    marks = []
    for i, _ in enumerate(job.results()):
        if i % max(1, len(texts) // 10) == 0:
            marks.append(f"{i}@{time.perf_counter() - started:.2f}s")
    return time.perf_counter() - started, marks, job.status().attempts[-1].ranks[0]


def hottest(raw: Path, top: int = 25) -> str:
    """py-spy's raw stacks, summed: the frames most often on top (own) and anywhere in the stack."""
    own, anywhere = collections.Counter(), collections.Counter()
    for line in raw.read_text().splitlines():
        stack, count = line.rsplit(" ", 1)
        frames = stack.split(";")[1:]  # the first is the thread
        if not frames:
            continue
        own[frames[-1]] += int(count)
        for frame in set(frames):
            anywhere[frame] += int(count)
    lines = ["own samples:"] + [f"  {n:6d} {f}" for f, n in own.most_common(top)]
    return "\n".join(lines + ["in the stack:"] + [f"  {n:6d} {f}" for f, n in anywhere.most_common(top)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--model", choices=("bundled", "empty"), default="bundled")
    args = parser.parse_args()
    texts = load_texts(args.rows)
    with tempfile.TemporaryDirectory(prefix="distinfer-rank-profile-") as tmp:
        model = model_path() if args.model == "bundled" else tiny_encoder(Path(tmp) / "model", layers=0)
        reference = BertModel.from_pretrained(model).to(args.device).eval()
        tokenizer = AutoTokenizer.from_pretrained(model)
        plain_loop(reference, tokenizer, texts)  # the untimed pass
        started = time.perf_counter()
        plain_loop(reference, tokenizer, texts)
        print(f"plain loop, float32: {args.rows / (time.perf_counter() - started):,.0f} rows/s")
        del reference
        with (
            LocalCluster(slots=1, device=args.device, model_roots=(tmp,)) as cluster,
            Client(cluster.address) as client,
        ):
            for _ in range(3):
                seconds, marks, rank = one_job(client, texts, model)
                t = rank.timings
                print(
                    f"distinfer: {args.rows / seconds:,.0f} rows/s ({seconds:.2f} s); rows at the client: "
                    f"{' '.join(marks)}; the rank's tokenize {t.tokenize_s:.2f} s, compute {t.compute_s:.2f} s, "
                    f"gather {t.gather_s:.2f} s"
                )
            spy = shutil.which("py-spy")
            if not spy:
                print("(no py-spy here: no profile)")
                return
            raw = Path(tmp) / "executor.raw"
            duration = str(PROFILED_S + 2)
            command = [spy, "record", "-p", str(rank.pid), "-r", "200", "-f", "raw", "-o", str(raw), "-d", duration]
            profiler = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1)
            until = time.monotonic() + PROFILED_S
            while time.monotonic() < until:
                one_job(client, texts, model)
            profiler.wait()
            print(hottest(raw))


if __name__ == "__main__":
    main()
