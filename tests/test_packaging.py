"""pyproject.toml: the pins of requirements*.txt, and console scripts that point at real entry points."""
import importlib
import pathlib
import subprocess
import sys
import textwrap
import tomllib

REPO = pathlib.Path(__file__).resolve().parents[1]


def _pins(name: str) -> list[str]:
  lines = (REPO / name).read_text().splitlines()
  return [line.strip() for line in lines if line.strip() and not line.startswith('#')]


def _project() -> dict:
  return tomllib.loads((REPO / 'pyproject.toml').read_text())['project']


def test_dependencies_are_the_requirements_pins():
  project = _project()
  extras = project['optional-dependencies']
  assert set(project['dependencies']) | set(extras['test']) == set(_pins('requirements.txt'))
  assert not set(project['dependencies']) & set(extras['test'])
  assert extras['tpu'] == _pins('requirements-tpu.txt') and extras['torch'] == ['torch==2.13.0']
  assert extras['text'] == ['tokenizers==0.22.1'] and not any('tokenizers' in d for d in project['dependencies'])
  assert 'torch==2.13.0' in _pins('requirements.txt')


def test_console_scripts_name_callable_entry_points():
  scripts = _project()['scripts']
  assert set(scripts) == {f'spikingformer-{name}' for name in
                          ('train', 'eval', 'convert', 'energy', 'audit', 'suite', 'sweep')}
  for target in scripts.values():
    module, function = target.split(':')
    assert callable(getattr(importlib.import_module(module), function)), target


def test_vision_needs_no_tokenizers_and_text_names_the_extra():
  """Without `tokenizers` (the [text] extra) an image config still resolves its task; a tokenizer says what to
  install."""
  script = textwrap.dedent("""
      import sys
      sys.modules['tokenizers'] = None  # as if not installed: importing it raises ImportError
      from experiments import digits
      from spikingformer_jax import tasks
      from spikingformer_jax.text import tokenizer
      assert type(tasks.get_task(digits.get_config())).__name__ == 'ImageClassification'
      try:
        tokenizer.WordPiece({t: i for i, t in enumerate(tokenizer.SPECIAL_TOKENS)}, max_len=8)
      except ImportError as e:
        print(e)
      """)
  result = subprocess.run([sys.executable, '-c', script], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  assert 'pip install "spikingformer-jax[text]"' in result.stdout
