"""Hand-built tiny graphs for the pass unit tests (onnx.helper), and running them under ONNX Runtime."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

OPSET = 20
RNG = np.random.default_rng(0)


def rand(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


class GraphBuilder:
    """Collects nodes/initializers; ``model()`` returns an ``ir.Model`` (opset 20)."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._n = 0

    def input(self, name: str, shape: Sequence[int | str]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape)))
        return name

    def output(self, name: str, rank: int = 3) -> None:
        dims = [f"{name}_d{i}" for i in range(rank)]
        self.outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, dims))

    def init(self, array: np.ndarray, name: str | None = None) -> str:
        self._n += 1
        name = name or f"w{self._n}"
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def op(self, op_type: str, inputs: Sequence[str], out: str | None = None, n_out: int = 1, **attrs: object) -> str:
        self._n += 1
        outs = (
            [out or f"{op_type.lower()}{self._n}"]
            if n_out == 1
            else [f"{op_type.lower()}{self._n}_{i}" for i in range(n_out)]
        )
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, **attrs))
        return outs[0] if n_out == 1 else ",".join(outs)

    def rmsnorm(self, x: str, eps: float = 1e-6) -> str:
        """Unit-scale RMSNorm exactly as the exporter writes it."""
        sq = self.op("Pow", [x, self.init(np.array(2.0, np.float32))])
        ms = self.op("ReduceMean", [sq, self.init(np.array([-1], np.int64))], keepdims=1)
        r = self.op("Reciprocal", [self.op("Sqrt", [self.op("Add", [ms, self.init(np.array(eps, np.float32))])])])
        return self.op("Mul", [x, r])

    def model(self) -> ir.Model:
        graph = helper.make_graph(self.nodes, "g", self.inputs, self.outputs, self.inits)
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        proto.ir_version = 10
        onnx.checker.check_model(proto)
        return ir.serde.deserialize_model(proto)


def to_proto(model: ir.Model) -> onnx.ModelProto:
    return ir.serde.serialize_model(model)


def run(model: ir.Model | onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    proto = model if isinstance(model, onnx.ModelProto) else to_proto(model)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return list(sess.run(None, feeds))


def ops(model: ir.Model) -> Counter[str]:
    return Counter(n.op_type for n in model.graph)


def check(model: ir.Model) -> onnx.ModelProto:
    """ONNX checker (full check: strict shape and type inference)."""
    proto = to_proto(model)
    onnx.checker.check_model(proto, full_check=True)
    return proto
