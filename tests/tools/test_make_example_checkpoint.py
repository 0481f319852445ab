"""parity-make-example-checkpoint keeps the one overwrite rule: a previous example is replaced only with --overwrite."""

from __future__ import annotations

import json

from tests.helpers.tools import one_line_error, run_many


def test_a_previous_example_is_replaced_only_with_overwrite(tmp_path):
  example, other = tmp_path / "ex", tmp_path / "other"
  (example / "source").mkdir(parents=True)
  (example / "source" / "leaf").write_text("old leaf")
  (example / "MANIFEST.json").write_text(json.dumps({"format": "parity_jax.example_checkpoints/1"}))
  other.mkdir()
  (other / "MANIFEST.json").write_text("{}")  # a name the tool writes, in a directory that holds no example
  refused, passed_on = run_many(
      "make_example_checkpoint", [[f"--out={example}"], [f"--out={other}", "--overwrite", "--seed=1"]]
  )
  line = one_line_error(refused, f"--out={example} already holds ")
  assert line.endswith("refusing to overwrite it (pass --overwrite)"), line
  assert (example / "source" / "leaf").read_text() == "old leaf"
  # --overwrite lets it past the rule; what it then replaces is an example only, never anything else
  one_line_error(passed_on, "does not hold a previous example")
  assert sorted(p.name for p in other.iterdir()) == ["MANIFEST.json"] and (other / "MANIFEST.json").read_text() == "{}"
