#!/usr/bin/env python3
"""Peer for meshcanary's `split.hash: "flagd"`: asks flagd's own evaluator for a variant.

Reads JSON lines on stdin, one request per line:

    {"salt": "checkout-v2", "key": "user-42", "weights": [["canary", 10], ["stable", 90]]}

and writes exactly one JSON line per request on stdout, flushed at once:

    {"variant": "stable"}

`variant` is null when flagd picks no variant (empty key, total weight 0 or above
2^31-1, a non-integer weight, ...); flagd's caller would then serve the flag's default.
A line that is not a valid request gets {"error": "..."} so replies stay in step with
requests. Blank lines are skipped and get no reply.

How the peer is asked: meshcanary's `salt` is flagd's flag key and the split key is the
OpenFeature targeting key, so each request is evaluated as the flag `salt` with the
targeting rule {"fractional": weights} (the shorthand form, no bucketing expression).
That goes through `targeting()` -> JsonLogic -> `custom_ops.fractional`, the same path
the in-process evaluator (`FlagdCore`) takes. Nothing about the hash is reimplemented.

Needs only the standard library and the peer package, pinned for the semantics the
test vectors were made with:

    python3 -m venv VENV && VENV/bin/pip install openfeature-flagd-core==2.0.0
    VENV/bin/python tests/peers/flagd_peer.py < requests.jsonl
"""

import json
import logging
import sys
from importlib import metadata

from openfeature.contrib.tools.flagd.core.targeting import targeting
from openfeature.evaluation_context import EvaluationContext

# The version whose `fractional` (CBOR [flagKey, targetingKey], MurmurHash3 x86_32,
# (hash * total) >> 32) filter/policy/testdata/flagd_fractional.json was made with.
EXPECTED_VERSION = "2.0.0"

# flagd logs every "no variant" case at ERROR level; with thousands of random keys that
# would flood stderr, so keep it quiet unless -v is given.
if "-v" not in sys.argv[1:]:
    logging.getLogger("openfeature").addHandler(logging.NullHandler())
    logging.getLogger("openfeature").propagate = False


def evaluate(request: dict):
    """The variant flagd's evaluator picks for one request, or None."""
    salt = request["salt"]
    key = request["key"]
    weights = request["weights"]
    if not isinstance(salt, str) or not isinstance(key, str):
        raise ValueError("salt and key must be strings")
    if not isinstance(weights, list):
        raise ValueError("weights must be a list of [variant, weight]")
    rule = {"fractional": [list(w) if isinstance(w, (list, tuple)) else w for w in weights]}
    return targeting(salt, rule, EvaluationContext(targeting_key=key))


def reply(obj: dict) -> None:
    # ASCII-only output, so the locale's encoding cannot get in the way.
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main() -> int:
    try:
        version = metadata.version("openfeature-flagd-core")
    except metadata.PackageNotFoundError:
        version = "unknown"
    if version != EXPECTED_VERSION:
        print(f"flagd_peer: openfeature-flagd-core {version} installed, "
              f"vectors were made with {EXPECTED_VERSION}", file=sys.stderr)

    # Read bytes and decode UTF-8 ourselves: the locale must not decide what a key is.
    for raw in sys.stdin.buffer:
        try:
            line = raw.decode("utf-8", errors="strict").strip()
            if not line:
                continue
            request = json.loads(line)
            if not isinstance(request, dict):
                raise ValueError("request must be a JSON object")
            variant = evaluate(request)
        except (ValueError, KeyError, TypeError) as e:
            reply({"error": f"{type(e).__name__}: {e}"})
            continue
        reply({"variant": variant})
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:
        # The reader went away (e.g. the Rust test finished early): exit quietly.
        sys.exit(0)
