"""pyproject.toml: the pins of requirements*.txt, and console scripts that point at real entry points."""
import importlib
import pathlib
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
  assert 'torch==2.13.0' in _pins('requirements.txt')


def test_console_scripts_name_callable_entry_points():
  scripts = _project()['scripts']
  assert set(scripts) == {f'spikingformer-{name}' for name in
                          ('train', 'eval', 'convert', 'energy', 'audit', 'suite', 'sweep')}
  for target in scripts.values():
    module, function = target.split(':')
    assert callable(getattr(importlib.import_module(module), function)), target
