"""Time a first (and a warm) `moe chat` as a new user sees it: from launch to the spinner, the
banner and the `>>>` prompt. (It then types one message; "reply done" is when `>>>` has been drawn
three times, which prompt_toolkit's redraws can reach early: read it as a rough lower bound.)

    python bench/first_launch.py /tmp/launch-home [--runs 2]

Runs `moe` (the one on PATH) in a pseudo-terminal with HOME and MOECLI_CACHE inside the given
folder, so the first run starts with an empty compilation cache and history (the CPU kernels come
from the install, or are built on this first run if the install could not build them); later runs
reuse that cache (warm launches). Prints one line of timings (seconds) per run.
"""
from __future__ import annotations

import argparse
import os
import pty
import select
import time

MESSAGE = b"Good morrow, sir.\r"


def launch(home: str, max_tokens: int = 24, limit: float = 240.0) -> dict[str, float]:
    env = dict(os.environ, HOME=home, MOECLI_CACHE=os.path.join(home, "cache"), TERM="xterm", COLUMNS="100")
    start = time.time()
    pid, fd = pty.fork()
    if pid == 0:
        os.execvpe("moe", ["moe", "chat", "--max-tokens", str(max_tokens)], env)
    screen, marks, sent_at = b"", {}, None

    def mark(name):
        marks.setdefault(name, round(time.time() - start, 1))

    while time.time() - start < limit:
        if not select.select([fd], [], [], 0.2)[0]:
            continue
        try:
            screen += os.read(fd, 65536)
        except OSError:
            break
        if b"loading" in screen:
            mark("spinner")
        if b"moe chat" in screen and b"context" in screen:
            mark("banner")
        if b">>>" in screen and "banner" in marks:
            mark("prompt")
            if sent_at is None:
                os.write(fd, MESSAGE)
                sent_at = len(screen)
        if sent_at is not None and screen.count(b">>>") >= 3:  # the prompt's redraw, then the next prompt
            mark("reply done")
            break
    os.write(fd, b"\x04")
    time.sleep(0.5)
    try:
        os.kill(pid, 9)
    except OSError:
        pass
    return marks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("home", help="a folder for HOME and MOECLI_CACHE (empty for a first launch)")
    parser.add_argument("--runs", type=int, default=2, help="launches: the first, then warm ones")
    args = parser.parse_args()
    os.makedirs(args.home, exist_ok=True)
    for run in range(args.runs):
        print(f"launch {run + 1}: {launch(os.path.abspath(args.home))}  (load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
