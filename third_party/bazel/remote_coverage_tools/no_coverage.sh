#!/bin/sh
# Every Bazel test rule names the coverage tools as an implicit dependency, so
# they must exist for `bazel test`; only `bazel coverage` runs them.
echo "hk_rnn: bazel coverage is not set up in this workspace: its coverage" \
  "tools are an offline stand-in (third_party/bazel/README.md). Measure" \
  "coverage with pytest instead." >&2
exit 1
