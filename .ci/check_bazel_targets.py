"""Checks that the Bazel BUILD files cover every Python file of the project.

Run from anywhere: `python3 .ci/check_bazel_targets.py`. It needs neither
Bazel nor a virtualenv; it reads the BUILD files as the Python syntax they
are, and fails, with one line per problem saying what to add where, when

- a `.py` file under hk_rnn/, hk_rnn_test/, examples/ or benchmarks/ is in no
  target's `srcs` (exempt: `conftest.py`, which only pytest reads, and
  `__init__.py` files holding nothing but a docstring, which Bazel writes
  into runfiles itself);
- a `*_test.py` file is not the source of its own `py_test`, or does not end
  in `absltest.main()` (Bazel runs a test file as a script: without it the
  file defines its tests, runs none, and passes);
- an `examples/<name>/train.py` is not a `py_binary` named `train`;
- a target lists a source file that does not exist;
- a file imports a first-party module whose target is not in its target's
  `deps` (Bazel would leave that module out of the runfiles).
"""

import ast
import fnmatch
import functools
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Directories whose Python files Bazel must know about, and the first-party
# import names they provide.
COVERED = ("hk_rnn", "hk_rnn_test", "examples", "benchmarks")
RULES = ("py_library", "py_test", "py_binary")


@dataclass
class Target:
  label: str  # "//package:name"
  rule: str
  build_file: str
  srcs: list[str] = field(default_factory=list)  # paths from ROOT
  deps: list[str] = field(default_factory=list)  # absolute labels


def absolute_label(label: str, package: str) -> str:
  """`:x`, `//p` and `//p:x` as `//p:x`, relative to `package`."""
  if label.startswith(":"):
    return f"//{package}{label}"
  if label.startswith("//") and ":" not in label:
    return f"{label}:{label.rsplit('/', 1)[-1]}"
  return label


def label_to_path(label: str, package: str) -> str:
  """A source-file label (or a plain file name) as a path from ROOT."""
  if label.startswith("//"):
    package, name = label[2:].split(":")
  else:
    name = label.lstrip(":")
  return os.path.join(package, name) if package else name


def project_files() -> list[str]:
  """Files git tracks or would track (paths from ROOT), else every file."""
  try:
    listing = subprocess.run(
      ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
      cwd=ROOT,
      capture_output=True,
      text=True,
      check=True,
    ).stdout.splitlines()
  except (OSError, subprocess.CalledProcessError):
    listing = [
      os.path.relpath(os.path.join(directory, name), ROOT)
      for directory, _, names in os.walk(ROOT)
      for name in names
    ]
  return sorted(
    path for path in listing if os.path.isfile(os.path.join(ROOT, path))
  )


def literal_strings(node: ast.expr, package: str, what: str) -> list[str]:
  """A list of string literals, or a `glob([...], exclude=[...])`."""
  if isinstance(node, ast.List) and all(
    isinstance(item, ast.Constant) and isinstance(item.value, str)
    for item in node.elts
  ):
    return [item.value for item in node.elts]
  if (
    isinstance(node, ast.Call)
    and isinstance(node.func, ast.Name)
    and node.func.id == "glob"
  ):
    include = literal_strings(node.args[0], package, what)
    exclude = []
    for keyword in node.keywords:
      if keyword.arg == "exclude":
        exclude = literal_strings(keyword.value, package, what)
    directory = os.path.join(ROOT, package)
    return sorted(
      name
      for name in os.listdir(directory)
      if os.path.isfile(os.path.join(directory, name))
      and any(fnmatch.fnmatch(name, pattern) for pattern in include)
      and not any(fnmatch.fnmatch(name, pattern) for pattern in exclude)
    )
  raise ValueError(
    f"{what}: expected a list of strings or glob([...]), got "
    f"{ast.unparse(node)}"
  )


def read_build_file(path: str) -> Iterator[Target]:
  """The py_* targets and aliases one BUILD file declares."""
  package = os.path.dirname(path)
  with open(os.path.join(ROOT, path), encoding="utf-8") as file:
    module = ast.parse(file.read(), filename=path)
  for statement in module.body:
    call = statement.value if isinstance(statement, ast.Expr) else None
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name)):
      continue
    if call.func.id not in RULES + ("alias",):
      continue
    arguments = {keyword.arg: keyword.value for keyword in call.keywords}
    name = ast.literal_eval(arguments["name"])
    target = Target(f"//{package}:{name}", call.func.id, path)
    where = f"{path}: {target.label}"
    if call.func.id == "alias":
      actual = ast.literal_eval(arguments["actual"])
      target.deps = [absolute_label(actual, package)]
    else:
      for label in literal_strings(
        arguments.get("srcs", ast.List([])), package, f"{where} srcs"
      ):
        target.srcs.append(label_to_path(label, package))
      target.deps = [
        absolute_label(label, package)
        for label in literal_strings(
          arguments.get("deps", ast.List([])), package, f"{where} deps"
        )
      ]
    yield target


@functools.cache
def parse_python(path: str) -> ast.Module:
  with open(os.path.join(ROOT, path), encoding="utf-8") as file:
    return ast.parse(file.read(), filename=path)


def imported_modules(path: str) -> Iterator[str]:
  """Dotted names of every module a file imports, relative ones resolved."""
  module = parse_python(path)
  package = os.path.dirname(path).replace(os.sep, ".")
  for node in ast.walk(module):
    if isinstance(node, ast.Import):
      for alias in node.names:
        yield alias.name
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = package.split(".")
        parts = parts[: len(parts) - node.level + 1]
        base = ".".join(parts + ([node.module] if node.module else []))
      yield base
      for alias in node.names:
        yield f"{base}.{alias.name}"


def module_file(name: str, files: set[str]) -> str | None:
  """The project file a dotted module name imports, if it is one of ours."""
  path = name.replace(".", "/")
  for candidate in (f"{path}.py", f"{path}/__init__.py"):
    if candidate in files:
      return candidate
  return None


def is_trivial_init(path: str) -> bool:
  """An `__init__.py` with nothing in it but a docstring."""
  if os.path.basename(path) != "__init__.py":
    return False
  return all(
    isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
    for node in parse_python(path).body
  )


def runs_absltest(path: str) -> bool:
  """Whether the file calls `absltest.main()` under `__name__ == "__main__"`."""
  for node in parse_python(path).body:
    if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
      for inner in ast.walk(node):
        if (
          isinstance(inner, ast.Call)
          and ast.unparse(inner.func) == "absltest.main"
        ):
          return True
  return False


def check() -> list[str]:
  files = project_files()
  file_set = set(files)
  problems = []

  targets: dict[str, Target] = {}
  for build_file in (
    path for path in files if os.path.basename(path) in ("BUILD", "BUILD.bazel")
  ):
    if build_file.split("/")[0] not in COVERED and "/" in build_file:
      continue
    try:
      for target in read_build_file(build_file):
        targets[target.label] = target
    except (SyntaxError, ValueError, KeyError) as error:
      problems.append(f"{build_file}: cannot read: {error}")

  owners: dict[str, list[Target]] = {}
  for target in targets.values():
    for source in target.srcs:
      owners.setdefault(source, []).append(target)
      if source not in file_set:
        problems.append(
          f"{target.build_file}: {target.label} lists {source}, which does "
          "not exist: add the file, or remove it from srcs (or the target)"
        )

  def resolve(label: str) -> str:
    while label in targets and targets[label].rule == "alias":
      label = targets[label].deps[0]
    return label

  for path in files:
    if not path.endswith(".py") or path.split("/")[0] not in COVERED:
      continue
    name = os.path.basename(path)
    if name == "conftest.py":
      continue
    try:
      parse_python(path)
    except SyntaxError as error:
      problems.append(f"{path}: cannot parse: {error}")
      continue
    directory = os.path.dirname(path)
    # Haiku's layout: a BUILD file next to the code it describes.
    build_file = os.path.join(directory, "BUILD")
    if name.endswith("_test.py") and not runs_absltest(path):
      problems.append(
        f'{path} does not end in `if __name__ == "__main__": '
        "absltest.main()`: under Bazel it would run no tests and pass"
      )
    target_owners = owners.get(path, [])
    if not target_owners:
      if is_trivial_init(path):
        continue
      stem = name[: -len(".py")]
      if name == "__init__.py":
        stem = os.path.basename(directory)
      rule = "py_test" if name.endswith("_test.py") else "py_library"
      if directory.startswith("examples/") and name == "train.py":
        rule = "py_binary"
      problems.append(
        f"{path} has no Bazel target: add {rule}(name = "
        f'"{stem}", srcs = ["{name}"], deps = [...]) to {build_file}'
      )
      continue

    if name.endswith("_test.py"):
      if not any(
        t.rule == "py_test" and t.srcs == [path] for t in target_owners
      ):
        problems.append(
          f"{path} must be the only source of its own py_test in {build_file}"
        )
    if (
      directory.startswith("examples/")
      and name == "train.py"
      and not any(
        t.rule == "py_binary" and t.label.endswith(":train")
        for t in target_owners
      )
    ):
      problems.append(
        f'{path} must be the source of a py_binary named "train" in '
        f"{build_file}"
      )

    for module in sorted(set(imported_modules(path))):
      if module.split(".")[0] not in COVERED:
        continue
      imported = module_file(module, file_set)
      if imported is None or imported == path:
        continue
      providers = {t.label for t in owners.get(imported, [])}
      if not providers:
        continue  # Reported above as a file without a target.
      # The one to suggest: a library where there is one, else the test or
      # binary whose source it is.
      provider = min(
        owners[imported], key=lambda t: (t.rule != "py_library", t.label)
      ).label
      for owner in target_owners:
        deps = {resolve(dep) for dep in owner.deps}
        if owner.label in providers or deps & providers:
          continue
        problems.append(
          f"{path} imports {module}: add "
          f'"{shortest(provider, owner.label)}" to the deps '
          f"of {owner.label} in {owner.build_file}"
        )
  return problems


def shortest(label: str, relative_to: str) -> str:
  """`label` as a BUILD file in `relative_to`'s package would write it."""
  package, name = label[2:].split(":")
  if package == relative_to[2:].split(":")[0]:
    return f":{name}"
  if package.rsplit("/", 1)[-1] == name:
    return f"//{package}"
  return label


def main() -> int:
  problems = check()
  for problem in problems:
    print(problem, file=sys.stderr)
  if problems:
    print(
      f"check_bazel_targets: {len(problems)} problem(s); see docs/bazel.md",
      file=sys.stderr,
    )
    return 1
  print("check_bazel_targets: every Python file has its Bazel target")
  return 0


if __name__ == "__main__":
  sys.exit(main())
