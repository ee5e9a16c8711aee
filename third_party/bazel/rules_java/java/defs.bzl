"""The symbols `@bazel_tools` loads from rules_java, forwarded to the native rules.

An offline stand-in for rules_java (see ../../README.md): Bazel 4 registers
JDK toolchains whose BUILD files load these names; the rules themselves are
built into Bazel.
"""

java_binary = native.java_binary
java_import = native.java_import
java_library = native.java_library
java_plugin = native.java_plugin
java_proto_library = native.java_proto_library
java_runtime = native.java_runtime
java_test = native.java_test
java_toolchain = native.java_toolchain
