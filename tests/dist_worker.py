"""One torchrun worker running ``loratune`` for tests/test_distributed.py (not a test module itself).

``python -m torch.distributed.run ... tests/dist_worker.py train ARGS`` is ``-m loratune train ARGS`` plus two
test aids: ``{rank}`` in an argument becomes this worker's RANK (to give one rank a path the others do not
have), and with ``LORATUNE_TEST_AUDIT=DIR`` and ``LORATUNE_TEST_WATCH=PATH`` every file-system write under PATH
(opening for writing, mkdir, rename/replace, remove, rmtree) is appended to ``DIR/rank<RANK>.log``, seen through
Python's audit hooks (PEP 578): the real calls, nothing replaced.
"""
import os
import sys

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
EVENTS = {"os.mkdir": 0, "os.rename": 1, "os.remove": 0, "os.rmdir": 0, "shutil.rmtree": 0, "os.truncate": 0}


def install_audit(log_path: str, watch: str) -> None:
    root = os.path.realpath(watch)
    log = open(log_path, "a", buffering=1)
    busy = []

    def under(path) -> bool:
        if isinstance(path, int) or path is None:
            return False
        try:
            full = os.path.realpath(os.fsdecode(os.fspath(path)))
        except TypeError:
            return False
        return full == root or full.startswith(root + os.sep)

    def hook(event, args):
        if busy or (event != "open" and event not in EVENTS):
            return
        busy.append(1)
        try:
            if event == "open":
                path, mode, flags = args
                writing = any(c in mode for c in "wax+") if mode else bool(isinstance(flags, int) and flags & WRITE_FLAGS)
                if writing and under(path):
                    log.write(f"open {os.fsdecode(path)}\n")
            elif under(args[EVENTS[event]]) or (event == "os.rename" and under(args[0])):
                log.write(f"{event} {args[0]}\n")
        finally:
            busy.pop()

    sys.addaudithook(hook)


if __name__ == "__main__":
    rank = os.environ.get("RANK", "0")
    if os.environ.get("LORATUNE_TEST_AUDIT"):
        install_audit(os.path.join(os.environ["LORATUNE_TEST_AUDIT"], f"rank{rank}.log"), os.environ["LORATUNE_TEST_WATCH"])
    from loratune.cli import main

    sys.exit(main([a.replace("{rank}", rank) for a in sys.argv[1:]]))
