"""The simulated cluster: layout and inlet model, every GPU as numpy arrays with the sim backend's
physics, the plant (servers, rows, aisles, limits, clock locks), opaque load shapes, the LLM
service model, and the state the policies see (Fleet, Workload, View)."""
