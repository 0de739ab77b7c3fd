"""The networks: video RAFT (one feature pass per frame), the flow-stream I3D, and checkpoint loaders."""
