"""What a model computes, from its traced program: FLOPs and spike operands (`flops`), the spike-driven
audit (`audit`), and firing rates, synaptic operations and energy (`energy`)."""
