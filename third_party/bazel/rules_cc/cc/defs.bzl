"""The symbols `@bazel_tools` loads from rules_cc, forwarded to the native rules.

An offline stand-in for rules_cc (see ../../README.md). Every rule here is the
native one Bazel 4 has built in, so behaviour is exactly as with the real
rules_cc of that era, which was itself a thin wrapper.
"""

cc_binary = native.cc_binary
cc_import = native.cc_import
cc_library = native.cc_library
cc_proto_library = native.cc_proto_library
cc_test = native.cc_test
cc_toolchain = native.cc_toolchain
cc_toolchain_suite = native.cc_toolchain_suite
fdo_prefetch_hints = native.fdo_prefetch_hints
fdo_profile = native.fdo_profile
objc_library = native.objc_library
