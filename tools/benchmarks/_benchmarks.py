"""Shared by the benchmark scripts of both projects (so it imports neither): run a training of
train_net.py and write a result table into its section of BENCHMARKS.md."""
import os
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "BENCHMARKS.md"


def update_section(section, table, fallback):
    """Replace the text between ``<!-- {section}:begin -->`` and ``<!-- {section}:end -->``.

    Args:
        section: marker name, e.g. "bench_dsb2018"; table: Markdown to put there;
        fallback: where the table was also written, named in the message if the markers are missing.
    """
    begin, end = f"<!-- {section}:begin -->", f"<!-- {section}:end -->"
    text = BENCHMARKS.read_text()
    if begin in text and end in text:
        BENCHMARKS.write_text(text[: text.index(begin) + len(begin)] + "\n" + table + "\n" + text[text.index(end):])
        print(f"updated {BENCHMARKS}")
    else:
        print(f"markers {begin} / {end} not found in {BENCHMARKS}; table left in {fallback}")


def run_train_net(config, opts, log_path, threads):
    """Train with ``train_net.py --config-file config *opts`` (no test sets) in a subprocess with
    ``threads`` BLAS/torch threads; the log goes to ``log_path``, progress and errors to stdout.
    Raises SystemExit naming the log when the training fails."""
    cmd = [sys.executable, "train_net.py", "--config-file", str(config), *map(str, opts), "DATASETS.TEST", "()"]
    print("$", " ".join(cmd), flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                cwd=BENCHMARKS.parent, env=env)
        for line in proc.stdout:
            log.write(line)
            if "eta:" in line or "Error" in line or "Traceback" in line:
                print(line.rstrip(), flush=True)
        if proc.wait() != 0:
            raise SystemExit(f"training failed ({proc.returncode}); see {log_path}")


def print_provenance():
    """Print the command line (with OMP_NUM_THREADS) and the machine load, for BENCHMARKS.md."""
    import shlex

    repo = str(BENCHMARKS.parent) + "/"
    omp = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    print("command:", omp + " ".join(shlex.quote(a) for a in [sys.executable.replace(repo, ""), *sys.argv]))
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
