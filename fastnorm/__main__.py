"""Command line: python -m fastnorm {info, check, bench, profile}."""
import sys


def info(argv):
    import platform

    import torch

    import fastnorm
    from fastnorm import _ops

    build = _ops._C.build_info()
    print(f"fastnorm {fastnorm.__version__}")
    print(f"torch {torch.__version__} (extension built against {build['torch']}), "
          f"CUDA build {torch.version.cuda or 'none'}, Python {platform.python_version()}")
    print(f"backends: {fastnorm.backends()}")
    print(f"cpu: {platform.machine()}, {torch.get_num_threads()} threads, "
          f"kernels built for {build['cpu_capability']}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"cuda:{i}: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB, "
                  f"{p.multi_processor_count} SMs")
    else:
        print("cuda: no GPU visible")
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    commands = {"info": info}
    if not argv or argv[0] not in ("info", "check", "bench", "profile"):
        print("usage: python -m fastnorm {info,check,bench,profile} [options]", file=sys.stderr)
        return 2
    if argv[0] == "check":
        from fastnorm.check import main as run
    elif argv[0] == "profile":
        from fastnorm.profile import main as run
    elif argv[0] == "bench":
        from fastnorm.bench import main as run
    else:
        run = commands["info"]
    from fastnorm._cli import UsageError

    try:
        return run(argv[1:])
    except UsageError as e:
        print(f"fastnorm {argv[0]}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
