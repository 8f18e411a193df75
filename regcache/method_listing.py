"""``regcache methods [NAME ...]``: the quantization methods and each one's config fields, types and defaults."""

from __future__ import annotations

import argparse
import sys

from regcache.quant import MethodConfigError, describe_methods


def main(argv: list[str] | None = None) -> int:
    """Print every method's (or the named methods') fields with types and defaults; 2 on an unknown name."""
    parser = argparse.ArgumentParser(
        prog="regcache methods",
        description="List the quantization methods of `regcache validate --model.method` and their config "
        "fields: the bits are model.w_bits / model.a_bits, the other fields model.method_options.",
    )
    parser.add_argument("names", nargs="*", help="methods to show (default: all)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        text = describe_methods(args.names or None)
    except MethodConfigError as e:
        print(f"regcache methods: error: {e}", file=sys.stderr)
        return 2
    print("float: the unquantized model (no fields)\n")
    print(text.rstrip())
    print(
        "\nSet fields in a config as  model: {method: NAME, w_bits: 4, a_bits: 4, method_options: {FIELD: VALUE}};"
        "\n`regcache validate --config FILE --print_config` shows a run's effective values (docs/methods.md)."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
