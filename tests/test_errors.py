"""parity_jax.errors: the error types and first_line, the one rule that turns any exception into one line."""

import pytest

from parity_jax.errors import ComparisonError, UsageError, first_line


def test_a_comparison_error_is_a_usage_error():
  # the tools catch UsageError for exit 2; a ComparisonError must land there too
  assert issubclass(ComparisonError, UsageError)
  assert issubclass(UsageError, Exception)
  with pytest.raises(UsageError):
    raise ComparisonError("shapes differ")


def test_first_line_is_the_first_non_empty_line_stripped():
  assert first_line(ValueError("\n\n   shape (2, 3) != (3, 2)  \n  detail\nmore")) == "shape (2, 3) != (3, 2)"
  assert first_line("  plain text\nsecond") == "plain text"
  assert first_line(RuntimeError("one")) == "one"


def test_first_line_of_an_empty_message_is_the_type_name():
  assert first_line(KeyError()) == "KeyError"
  assert first_line(RuntimeError("  \n \n")) == "RuntimeError"
  assert first_line("") == ""  # a string has no type name to fall back to
  assert first_line("   \n") == ""


def test_first_line_drops_the_tensorstore_spec_suffix():
  msg = 'NOT_FOUND: Error opening "zarr" driver: not found [tensorstore_spec=\'{"driver":"zarr","kvstore":{}}\']'
  assert first_line(ValueError(msg)) == 'NOT_FOUND: Error opening "zarr" driver: not found'
  # only the suffix: text before it stays, and a line without it is untouched
  assert first_line("a [b] c") == "a [b] c"


def test_first_line_is_cut_at_300_characters():
  assert first_line("x" * 300) == "x" * 300  # exactly the limit: kept whole
  assert first_line("y" * 301) == "y" * 300 + "..."
  assert first_line("z" * 1000 + "\nsecond") == "z" * 300 + "..."


def test_arguments_are_named_as_flags_only_inside_a_tool_run():
  from parity_jax.errors import arg, named_as_flags

  assert arg("out") == "out"  # a library call: the Python argument's name
  with named_as_flags(["out", "overwrite"]):
    assert (arg("out"), arg("overwrite"), arg("spec")) == ("--out", "--overwrite", "spec")
    with named_as_flags(["spec"]):  # nested: the inner tool's flags only
      assert (arg("spec"), arg("out")) == ("--spec", "out")
    assert arg("spec") == "spec" and arg("out") == "--out"
  assert (arg("out"), arg("overwrite")) == ("out", "overwrite")  # left: the library's names again
  with pytest.raises(KeyError):
    with named_as_flags(["out"]):
      raise KeyError("boom")
  assert arg("out") == "out"  # also after an exception inside
