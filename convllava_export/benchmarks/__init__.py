"""Benchmarks behind `convllava-export bench`: every figure measured side by side in one run."""


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM). Unlike ru_maxrss it is not inherited across exec,
    so a spawned worker reports its own peak, not its parent's."""
    from ..progress import peak_rss_bytes

    return peak_rss_bytes() / 2**20


def run_in_fresh_process(target, *args):
    """Run `target(*args, queue)` in a spawned process and return what it puts on the queue:
    each backend gets its own memory, so its peak RSS is its own."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=target, args=(*args, q))
    p.start()
    import queue

    while True:  # a worker that dies (crash, OOM kill) must not leave us waiting forever
        try:
            res = q.get(timeout=5)
            break
        except queue.Empty:
            if not p.is_alive():
                raise RuntimeError(f"benchmark worker {getattr(target, '__name__', target)} exited with code {p.exitcode} before reporting") from None
    p.join()
    return res
