"""Step 1 of the pipeline: trace a model into a plain graph of layers, and run such a graph."""

from .graph import Graph, Node, trace_graph
from .network import GraphNetwork

__all__ = ["Graph", "GraphNetwork", "Node", "trace_graph"]
