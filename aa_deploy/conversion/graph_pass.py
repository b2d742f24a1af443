"""The graph pass: load -> find sites -> plan -> rewrite -> check -> save; `AntiAliasPass` is its onnx_ir form."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import onnx_ir as ir

from aa_deploy.common import model_io
from aa_deploy.common.atomic import refuse_overwrite
from aa_deploy.common.errors import InputError
from aa_deploy.common.version import __version__
from aa_deploy.conversion import cost, dense, fold, phases
from aa_deploy.conversion.plan import IMAGE_STEM, SKIP_STEM, Action, Options, plan
from aa_deploy.conversion.rewrite import rewrite
from aa_deploy.conversion.sites import find_sites
from aa_deploy.conversion.sites.levels import site_levels


@dataclass
class Conversion(ir.passes.PassResult):
    """What the pass did: the model (changed in place), whether it changed, every site's action, and how many
    blur nodes went in."""

    actions: list[Action] = field(default_factory=list)
    blurs: int = 0

    @property
    def opset_upgrade(self) -> dict | None:
        """{"from": old, "to": new} when the input's opset was upgraded before converting."""
        return model_io.read_metadata(self.model).get("opset_upgrade")

    @property
    def changed(self) -> list[Action]:
        return [a for a in self.actions if a.action != "skip"]


def annotate_shapes(model: ir.Model) -> None:
    """Static shapes for sites whose channel count is not in a weight (pooling, slicing)."""
    cost.with_shapes(model)


def prepare(model: ir.Model, options: Options = Options()) -> int:
    """Shapes for the analysis: with dense sampling, constant subgraphs folded first (exporters compute
    pads and shapes at run time that are static for the input size); how many nodes that removed. The
    blur-only path leaves the graph as it is."""
    folded = fold.fold_constants(model) if options.dense_last else 0
    annotate_shapes(model)
    return folded


def inspect(model: ir.Model, options: Options = Options()) -> list[Action]:
    """What `convert` would do to `model` (which is not changed beyond shape annotations and, with
    dense sampling, its constant subgraphs folded)."""
    prepare(model, options)
    return _plan(model, options)[0]


def _plan(model: ir.Model, options: Options) -> tuple[list[Action], dense.DensePlan | None]:
    """`inspect` on a prepared model, with dense sampling's analysis of it (which refuses in one line what
    dense sampling cannot do exactly, before anything changes)."""
    actions = plan(find_sites(model.graph), options)
    return actions, dense.analyse(model.graph, actions)


@dataclass(frozen=True)
class Cost:
    """Multiply-adds of the original and of the converted model (a dynamic batch counted as 1)."""

    original: int
    converted: int
    unknown: int  # nodes left uncounted for lack of static shapes

    @property
    def ratio(self) -> float:
        return self.converted / self.original if self.original else float("nan")

    def describe(self) -> str:
        text = f"multiply-adds {self.original / 1e6:,.1f} M -> {self.converted / 1e6:,.1f} M (x{self.ratio:.2f})"
        return text + (f"; {self.unknown} nodes without static shapes not counted" if self.unknown else "")


def plan_cost(model: ir.Model, options: Options = Options()) -> Cost:
    """What converting `model` with `options` costs at inference, counted on a converted copy."""
    copy = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    if options.phases != "all":  # the phases stack on the batch axis: a dynamic batch would leave them uncounted
        cost.batch_of_one(copy)
    fold.fold_constants(copy)  # a copy: shapes the exporter computes at run time count too
    annotate_shapes(copy)
    before, unknown_before = cost.multiply_adds(copy)
    convert_model(copy, options)
    annotate_shapes(copy)  # the blurs' shapes
    after, unknown_after = cost.multiply_adds(copy)
    return Cost(before, after, max(unknown_before, unknown_after))


@dataclass(frozen=True)
class DenseCost:
    """What `--dense-last n` would cost, or why it is refused."""

    n: int
    cost: Cost | None
    refused: str | None = None

    def as_dict(self) -> dict:
        return {"dense_last": self.n, "ratio": self.cost.ratio if self.cost else None, "refused": self.refused}


def dense_costs(model: ir.Model, options: Options = Options()) -> list[DenseCost]:
    """The multiply-adds of `options` with dense sampling at every number of levels the graph has."""
    copy = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    prepare(copy, replace(options, dense_last=1))
    levels = len(set(site_levels(find_sites(copy.graph))))
    costs = []
    for n in range(1, levels + 1):
        try:
            costs.append(DenseCost(n, plan_cost(model, replace(options, dense_last=n))))
        except InputError as e:
            costs.append(DenseCost(n, None, str(e)))
    return costs


def convert_model(model: ir.Model, options: Options = Options()) -> Conversion:
    """Insert blurs into `model` in place and record what was done in its metadata."""
    g = model.graph
    declared = [(v.shape, v.type) for v in (*g.inputs, *g.outputs)]
    folded = prepare(model, options)
    actions, densified = _plan(model, options)
    blurs = rewrite(g, actions)
    if blurs:  # the blurs are in the map: analysed again
        densified = dense.analyse(g, actions)
    stacked = 0
    if densified is not None:
        if options.phases == "all":
            dense.apply(g, densified)
        else:
            stacked = phases.stack(g, actions, densified, options.phases)
        annotate_shapes(model)
    for value, (shape, type_) in zip((*g.inputs, *g.outputs), declared):  # the interface stays as declared
        value.shape, value.type = shape, type_
    if blurs or densified is not None:
        model_io.write_metadata(
            model,
            {
                "version": __version__,
                # the stem decision as made, so that the twin built from this record does the same
                "options": replace(
                    options, skip_stem=bool(actions) and actions[0].note in (SKIP_STEM, IMAGE_STEM)
                ).as_dict(),
                "filter": options.filter_label,
                "mode": options.mode,
                "pad": options.pad,
                "sites": [a.describe() for a in actions],
            }
            | (
                {"dense": {"folded_nodes": folded, "per_phase_pools": densified.per_phase}}
                | ({"phases": {"kept": options.phases, "combinations": stacked}} if stacked else {})
                if densified is not None
                else {}
            ),
        )
    return Conversion(model, blurs > 0 or densified is not None, actions, blurs)


class AntiAliasPass(ir.passes.InPlacePass):
    """`convert_model` as an onnx_ir pass, to run in an `ir.passes.PassManager` beside others:
    `AntiAliasPass(options)(model)` changes `model` in place and returns its `Conversion`."""

    def __init__(self, options: Options = Options()) -> None:
        super().__init__()
        self.options = options

    def call(self, model: ir.Model) -> Conversion:
        return convert_model(model, self.options)


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike | None = None,
    options: Options = Options(),
    *,
    in_place: bool = False,
    check: bool = True,
    allow_empty: bool = False,
    target_opset: int | None = None,
) -> Conversion:
    """Convert the model file `src` and write it to `dst` (atomically; never over `src` unless `in_place`);
    the converted graph stays in memory as the result's `model`."""
    src = Path(src)
    if in_place:
        dst = src
    elif dst is None:
        raise InputError("no output path given (-o FILE, or --in-place)")
    dst = Path(dst)
    if not in_place:
        refuse_overwrite(dst, src)
    model = model_io.load(src, target_opset)
    if (bad := model_io.non_finite(model)) is not None:
        raise InputError(f"{src}: initializer {bad!r} holds non-finite values (NaN or inf): export the model again")
    external = model_io.uses_external_data(model)
    result = convert_model(model, options)
    if not result.actions and not allow_empty:
        raise InputError(f"{src}: no downsampling sites found, nothing to convert")
    save_converted(model, src, dst, external=external, check=check)
    return result


def save_converted(model: ir.Model, src: str | os.PathLike, dst: Path, *, external: bool, check: bool) -> None:
    """Write the conversion of the file `src` to `dst` (atomically, `model_io.save`); where onnx.checker
    refuses it, say in one line whether the input fails it already."""
    try:
        model_io.save(model, dst, external=external, check=check)
    except model_io.CheckError as e:
        # Whose fault? Only on this failure path is the input checked too.
        complaint = model_io.check_input(src)
        if complaint is not None:
            raise InputError(
                f"{src}: the input model fails onnx.checker already ({complaint}); --no-check skips the check"
            ) from None
        raise InputError(f"the converted model fails onnx.checker: {e}") from None
