"""Switch a concurrent.futures program from ProcessPoolExecutor to DistributedExecutor.

Run it with ``python examples/executor_switch.py [process|distexec]`` (default: distexec).
The only line that differs between the two runs is the one that makes the executor.
"""

import concurrent.futures as cf
import math
import sys

import distexec


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    return all(n % k for k in range(2, math.isqrt(n) + 1))


def checked_sqrt(x: float) -> float:
    if x < 0:
        raise ValueError(f"negative input: {x}")
    return math.sqrt(x)


def main() -> None:
    kind = sys.argv[1] if len(sys.argv) > 1 else "distexec"
    if kind == "process":
        executor = cf.ProcessPoolExecutor(max_workers=2)
    else:
        executor = distexec.DistributedExecutor(max_workers=2)  # the one-line switch

    with executor as ex:
        numbers = range(100_000, 100_200)
        primes = [n for n, p in zip(numbers, ex.map(is_prime, numbers, chunksize=50)) if p]
        print(f"{len(primes)} primes between 100000 and 100200, the first is {primes[0]}")

        futures = {ex.submit(checked_sqrt, x): x for x in (4.0, -1.0, 9.0)}
        for future in cf.as_completed(futures):
            x = futures[future]
            try:
                print(f"sqrt({x}) = {future.result()}")
            except ValueError as exc:  # the original exception type, as with any executor
                print(f"sqrt({x}) failed: {exc!r}")
                if kind != "process":
                    print("  note:", exc.__notes__[0])
                    print("  remote traceback (exc.__cause__):", str(exc.__cause__).rstrip())


if __name__ == "__main__":
    main()
