"""Step 1 of the pipeline: trace a model into a plain graph of layers, and run such a graph."""

from .graph import Graph, Node, trace_graph
from .network import GraphNetwork, weights_of
from .overlays import overlaid, overlay_maps, plain

__all__ = ["Graph", "GraphNetwork", "Node", "overlaid", "overlay_maps", "plain", "trace_graph", "weights_of"]
