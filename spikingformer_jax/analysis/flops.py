"""Every multiply-accumulate product of a traced forward pass: where it is, its FLOPs, its operands.

One interpreter over the jaxpr of a function serves both the energy estimate and the spike-driven
audit. It walks the equations in program order (inlining jit / remat / custom_jvp / custom_vjp
calls) and, at every `conv_general_dilated` and `dot_general`, records a `Product`:

- `location`: the Flax module path from the equation's name stack, e.g. 'tokenizer/stage0/conv'.
- `macs`: multiply-accumulates computed from the traced shapes (a conv counts every output element
  times its kernel volume, padding included, as the reference's syops counter does).
- per operand: whether it is computed from the model input (`from_input`; parameters are not) and
  whether it is *provably* binary (only 0 or 1), decided by a static data-flow analysis.

Provably binary values start at booleans: a spike function is a Heaviside, i.e. a comparison cast
to a number (the `spike` custom_vjp of surrogates.py is a `ge` followed by `convert_element_type`
inside its primal jaxpr, which the interpreter inlines). Binary-ness then survives shape-only ops
(reshape, transpose, broadcast, slicing, gather, concatenation), casts, max-pooling whose windows
always hold a real element, padding with 0 or 1, products/max/min of binary values, and `select_n`
between binary values. Anything else (a sum, a scale, a BatchNorm) is not binary.

Inputs are not binary unless declared so (`binary_argnums`): a text model's 0/1 attention mask,
which zeroes padded keys and values, must be declared, or the masked k and v would count as real.

When evaluating (`evaluate`), the interpreter also returns, for every input-derived operand, its
mean value and whether all its values were 0 or 1 in that batch: the measured firing rate
(`operand_stats` replaces the plain mean, e.g. by a mean over real tokens only).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np

from spikingformer_jax import layers

PRODUCT_PRIMITIVES = ('conv_general_dilated', 'dot_general')

# Calls whose body is inlined: evaluating the body is the call's forward pass.
_INLINED_CALLS = ('jit', 'pjit', 'closed_call', 'core_call', 'remat2', 'checkpoint', 'custom_jvp_call',
                  'custom_vjp_call', 'custom_vjp_call_jaxpr')
# Output binary iff the first operand is (later operands are indices, sizes or shapes).
_KEEPS_FIRST = frozenset((
    'reshape', 'transpose', 'broadcast_in_dim', 'squeeze', 'expand_dims', 'rev', 'slice',
    'dynamic_slice', 'gather', 'copy', 'copy_p', 'convert_element_type', 'reduce_precision', 'reduce_max',
    'reduce_min', 'reduce_and', 'reduce_or', 'stop_gradient', 'sharding_constraint', 'mesh_cast',
    'reshard', 'abs', 'floor', 'ceil', 'round', 'sign', 'cummax', 'cummin', 'name'))
# Output binary iff every operand is.
_KEEPS_ALL = frozenset(('mul', 'max', 'min', 'and', 'or', 'concatenate', 'pad'))


class _Info(NamedTuple):
  """What the analysis knows about one value."""
  binary: bool  # provably only 0 or 1
  from_input: bool  # depends on the model input (not only on parameters and constants)
  upstream: frozenset  # indices of the products it depends on


_CONSTANT = _Info(False, False, frozenset())


@dataclasses.dataclass(frozen=True)
class Operand:
  shape: tuple[int, ...]
  from_input: bool
  binary: bool  # provably binary (static analysis)


@dataclasses.dataclass(frozen=True)
class Product:
  """One conv / dot_general of the traced function."""
  index: int
  location: str
  primitive: str
  macs: int  # for the traced shapes (the whole traced batch)
  operands: tuple[Operand, Operand]
  reads_input: bool  # no other product lies between the model input and this one (the stem)
  feeds_output: bool = False  # no product consumes its result (the read-out head)

  @property
  def spike_driven(self) -> bool:
    """True when an input-derived operand is provably binary: every multiply is then an addition."""
    return any(o.from_input and o.binary for o in self.operands)


@dataclasses.dataclass(frozen=True)
class Trace:
  products: tuple[Product, ...]
  scopes: tuple[str, ...]  # module paths (name stacks) in the order their first equation runs

  def program_order(self, path: str) -> int:
    """Position of the module `path` in the program (len(scopes) if it runs no equation)."""
    for i, scope in enumerate(self.scopes):
      if scope == path or scope.startswith(path + '/'):
        return i
    return len(self.scopes)


class OperandStats(NamedTuple):
  """Measured on one batch; None for operands that are not computed from the input."""
  mean: jax.Array
  all_binary: jax.Array


def product_macs(primitive: str, lhs_shape, rhs_shape, out_shape, params) -> int:
  """Multiply-accumulates of one conv_general_dilated or dot_general from its shapes."""
  if primitive == 'dot_general':
    (_, rhs_contract), (_, rhs_batch) = params['dimension_numbers']
    rhs_free = [d for i, d in enumerate(rhs_shape) if i not in rhs_contract and i not in rhs_batch]
    # Every lhs element (batch, contracted or free index) meets every free rhs element once.
    return math.prod(lhs_shape) * math.prod(rhs_free)
  if primitive == 'conv_general_dilated':
    out_feature_dim = params['dimension_numbers'].rhs_spec[0]
    # Each output element sums kernel volume x input features per group.
    return math.prod(out_shape) * (math.prod(rhs_shape) // rhs_shape[out_feature_dim])
  raise ValueError(f'Not a product primitive: {primitive!r}.')


def _literal_binary(value) -> bool:
  try:
    arr = np.asarray(value)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return False
  return arr.dtype == bool or bool(np.all((arr == 0) | (arr == 1)))


def _pool_never_all_padding(params) -> bool:
  """reduce_window_max pads with -inf: its output stays binary only if no window is all padding."""
  if any(d != 1 for d in (*params['base_dilation'], *params['window_dilation'])):
    return False
  return all(lo < w and hi < w for (lo, hi), w in zip(params['padding'], params['window_dimensions']))


def _binary_rule(eqn, binary: Sequence[bool]) -> list[bool]:
  """Provable binary-ness of each output of an equation without sub-jaxprs."""
  name = eqn.primitive.name
  outs = eqn.outvars
  if all(v.aval.dtype == jnp.bool_ for v in outs):
    return [True] * len(outs)
  if name in _KEEPS_FIRST:
    result = binary[0]
  elif name in _KEEPS_ALL:
    result = all(binary)
  elif name == 'select_n':  # select_n(predicate, *cases)
    result = all(binary[1:])
  elif name == 'dynamic_update_slice':
    result = binary[0] and binary[1]
  elif name == 'reduce_window_max':
    result = binary[0] and _pool_never_all_padding(eqn.params)
  elif name == 'integer_pow':
    result = binary[0] and eqn.params['y'] >= 1
  elif name in ('device_put', 'optimization_barrier'):
    return list(binary)
  else:
    result = False
  return [result] * len(outs)


def _sub_jaxprs(params) -> list:
  found = []
  for value in params.values():
    for item in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(item, jex.core.ClosedJaxpr):
        found.append(item.jaxpr)
      elif isinstance(item, jex.core.Jaxpr):
        found.append(item)
  return found


def _contains_products(jaxpr) -> bool:
  return any(e.primitive.name in PRODUCT_PRIMITIVES or any(_contains_products(j) for j in _sub_jaxprs(e.params))
             for e in jaxpr.eqns)


def _inlined_body(eqn):
  """(jaxpr, consts) of a call whose body can be walked in place of the call, else None."""
  if eqn.primitive.name not in _INLINED_CALLS:
    return None
  body = eqn.params.get('call_jaxpr', eqn.params.get('jaxpr'))
  if isinstance(body, jex.core.ClosedJaxpr):
    body, consts = body.jaxpr, body.consts
  else:
    consts = ()
  if len(body.invars) != len(eqn.invars):
    raise NotImplementedError(f'{eqn.primitive.name}: body takes {len(body.invars)} inputs for '
                              f'{len(eqn.invars)} operands; cannot inline it.')
  return body, consts


def _join(prefix: str, name: str) -> str:
  return '/'.join(p for p in (prefix, name) if p)


class _Walker:
  """Interprets a jaxpr. With values=None it only runs the static analysis (nothing is computed)."""

  def __init__(self, root: str = '', operand_stats: Optional[Callable] = None):
    self.root = root
    self.operand_stats = operand_stats or measure_operand
    self.products: list[Product] = []
    self.stats: list[tuple[Optional[OperandStats], ...]] = []
    self._consumes: list[frozenset] = []  # per product: the products its operands depend on
    self.scopes: dict[str, None] = {}  # ordered set of the locations seen

  def strip_root(self, location: str) -> str:
    return location[len(self.root) + 1:] if location.startswith(self.root + '/') else location

  def walk(self, jaxpr, consts, values, infos, prefix=''):
    evaluate = values is not None
    env_val, env_info = {}, {}

    def read(var):
      if isinstance(var, jex.core.Literal):
        return var.val, _Info(_literal_binary(var.val), False, frozenset())
      return env_val.get(var), env_info[var]

    for var, const in zip(jaxpr.constvars, consts):
      env_val[var], env_info[var] = const, _CONSTANT._replace(binary=_literal_binary(const))
    for var, value, info in zip(jaxpr.invars, values if evaluate else [None] * len(infos), infos):
      env_val[var], env_info[var] = value, info

    for eqn in jaxpr.eqns:
      in_vals, in_infos = zip(*map(read, eqn.invars)) if eqn.invars else ((), ())
      location = _join(prefix, str(eqn.source_info.name_stack))
      self.scopes.setdefault(self.strip_root(location))
      body = _inlined_body(eqn)
      if body is not None:
        out_vals, out_infos = self.walk(body[0], body[1], list(in_vals) if evaluate else None,
                                        list(in_infos), location)
      else:
        if eqn.primitive.name == 'ffi_call':
          raise ValueError(
              f'{location or "<top level>"}: a foreign-function call (such as the products of '
              'spikingformer_jax.kernels) hides its arithmetic from this analysis; trace the model with '
              'spike_kernels=False, which has the same parameters and computes the same products.')
        out_vals = self._bind(eqn, in_vals) if evaluate else [None] * len(eqn.outvars)
        if eqn.primitive.name in PRODUCT_PRIMITIVES:
          out_infos = [self._record(eqn, in_vals, in_infos, location, evaluate)]
        else:
          out_infos = self._propagate(eqn, in_infos, location)
      for var, value, info in zip(eqn.outvars, out_vals, out_infos):
        env_val[var], env_info[var] = value, info

    outs = [read(v) for v in jaxpr.outvars]
    return [v for v, _ in outs], [i for _, i in outs]

  @staticmethod
  def _bind(eqn, in_vals):
    out = eqn.primitive.bind(*in_vals, **eqn.primitive.get_bind_params(eqn.params))
    return out if eqn.primitive.multiple_results else [out]

  def _propagate(self, eqn, in_infos, location):
    if any(_contains_products(j) for j in _sub_jaxprs(eqn.params)):
      raise NotImplementedError(
          f'{location or "<top level>"}: a conv/dot_general inside `{eqn.primitive.name}` is not supported '
          '(its per-iteration operands cannot be measured); unroll the loop or make it a plain call.')
    from_input = any(i.from_input for i in in_infos)
    upstream = frozenset().union(*(i.upstream for i in in_infos))
    binary = [i.binary for i in in_infos]
    name = eqn.primitive.name
    if name == 'scan':
      out_binary = self._scan_binary(eqn.params, binary)
    elif name == 'cond':  # cond(index, *operands): binary if binary in every branch.
      branch_outs = [self._body_binary(b.jaxpr, b.consts, binary[1:]) for b in eqn.params['branches']]
      out_binary = [all(col) for col in zip(*branch_outs)]
    elif _sub_jaxprs(eqn.params):  # while loops and other control flow: nothing is claimed.
      out_binary = [False] * len(eqn.outvars)
    else:
      out_binary = _binary_rule(eqn, binary)
    return [_Info(b, from_input, upstream) for b in out_binary]

  def _body_binary(self, jaxpr, consts, binary):
    infos = [_Info(b, True, frozenset()) for b in binary]
    return [i.binary for i in _Walker().walk(jaxpr, consts, None, infos)[1]]

  def _scan_binary(self, params, binary):
    """Scan outputs: carries need a fixpoint (binary in the initial value and after every step)."""
    n_consts, n_carry = params['num_consts'], params['num_carry']
    consts, carry, xs = binary[:n_consts], binary[n_consts:n_consts + n_carry], binary[n_consts + n_carry:]
    body = params['jaxpr']
    while True:
      out = self._body_binary(body.jaxpr, body.consts, consts + carry + xs)
      new_carry = [c and o for c, o in zip(carry, out[:n_carry])]
      if new_carry == carry:
        return carry + out[n_carry:]
      carry = new_carry

  def _record(self, eqn, in_vals, in_infos, location, evaluate) -> _Info:
    lhs, rhs = eqn.invars
    out = eqn.outvars[0]
    location = self.strip_root(location)
    index = len(self.products)
    upstream = frozenset().union(*(i.upstream for i in in_infos))
    self._consumes.append(upstream)
    operands = tuple(Operand(tuple(v.aval.shape), i.from_input, i.binary) for v, i in zip(eqn.invars, in_infos))
    self.products.append(Product(
        index=index, location=location, primitive=eqn.primitive.name,
        macs=product_macs(eqn.primitive.name, lhs.aval.shape, rhs.aval.shape, out.aval.shape, eqn.params),
        operands=operands, reads_input=any(i.from_input for i in in_infos) and not upstream))
    if evaluate:
      self.stats.append(tuple(self.operand_stats(v, o) if o.from_input else None
                              for v, o in zip(in_vals, operands)))
    return _Info(False, any(i.from_input for i in in_infos), upstream | {index})

  def finish(self) -> Trace:
    """The products, with `feeds_output` set on those that no other product consumes (the read-out)."""
    consumed = frozenset().union(*self._consumes)
    products = tuple(dataclasses.replace(p, feeds_output=p.index not in consumed) for p in self.products)
    return Trace(products, tuple(self.scopes))


def measure_operand(value, operand: Operand) -> OperandStats:
  """The default operand statistics: the mean over all elements, and whether all are 0 or 1."""
  del operand
  v = value.astype(jnp.float32)
  return OperandStats(jnp.mean(v), jnp.all((v == 0) | (v == 1)))


def _flat_infos(args, input_argnums, binary_argnums):
  infos = []
  for i, arg in enumerate(args):
    info = _Info(i in binary_argnums, i in input_argnums, frozenset())
    infos += [info] * len(jax.tree_util.tree_leaves(arg))
  return infos


def _trace(fn, args, input_argnums, root, evaluate, binary_argnums=(), operand_stats=None):
  closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
  walker = _Walker(root, operand_stats)
  values = jax.tree_util.tree_leaves(args) if evaluate else None
  outs, _ = walker.walk(closed.jaxpr, closed.consts, values, _flat_infos(args, input_argnums, binary_argnums))
  outputs = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outs) if evaluate else None
  return outputs, walker.finish(), walker.stats


def trace(fn: Callable, *args, input_argnums: Sequence[int] = (1,), root: str = '',
          binary_argnums: Sequence[int] = ()) -> Trace:
  """The products of `fn(*args)` from shapes alone (`args` may be `jax.ShapeDtypeStruct`s).

  `input_argnums` says which arguments are the model input (the rest are parameters); `root` is a
  name-stack prefix to drop from locations (the top module's name); `binary_argnums` are inputs
  known to hold only 0 or 1 (an attention mask; the caller guarantees it).
  """
  return _trace(fn, args, tuple(input_argnums), root, False, tuple(binary_argnums))[1]


def evaluate(fn: Callable, *args, input_argnums: Sequence[int] = (1,), root: str = '',
             binary_argnums: Sequence[int] = (),
             operand_stats: Callable[[jax.Array, Operand], OperandStats] = measure_operand
             ) -> tuple[Any, Trace, list[tuple[Optional[OperandStats], ...]]]:
  """Runs `fn(*args)` through the interpreter (jit it): (outputs, trace, per-product operand stats)."""
  return _trace(fn, args, tuple(input_argnums), root, True, tuple(binary_argnums), operand_stats)


# A text model's inputs (input_ids, segment_ids, attention_mask) are arguments 1-3 of `model_forward`;
# the attention mask is 0/1 by contract.
TEXT_INPUT_ARGNUMS = (1, 2, 3)
TEXT_BINARY_ARGNUMS = (3,)


def text_inputs(batch: int, length: int) -> tuple[jax.ShapeDtypeStruct, ...]:
  """Shapes of a text model's (input_ids, segment_ids, attention_mask)."""
  return (jax.ShapeDtypeStruct((batch, length), jnp.int32),) * 3


def model_forward(model, train: bool = False) -> Callable:
  """(variables, *inputs) -> (outputs, {'spikes': ...}): a forward pass with every LIF output sown.

  train=True normalises with the batch's BatchNorm statistics, as a training step does (the updated
  running statistics come back in the state too and are not used).
  """
  mutable = [layers.SPIKES, 'batch_stats'] if train else [layers.SPIKES]
  return lambda variables, *inputs: model.apply(variables, *inputs, train=train, mutable=mutable)


def _abstract(variables):
  return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), variables)


def model_trace(model, variables, input_shape: Sequence[int], dtype=jnp.float32) -> Trace:
  """The products of a Flax model's inference pass for one input shape (batch included), from shapes only."""
  return trace(model_forward(model), _abstract(variables), jax.ShapeDtypeStruct(tuple(input_shape), dtype),
               root=type(model).__name__)


def text_model_trace(model, variables, batch: int, length: int) -> Trace:
  """The products of a text model's inference pass on [batch, length] tokens, from shapes only."""
  return trace(model_forward(model), _abstract(variables), *text_inputs(batch, length),
               input_argnums=TEXT_INPUT_ARGNUMS, binary_argnums=TEXT_BINARY_ARGNUMS, root=type(model).__name__)
