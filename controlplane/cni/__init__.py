"""weft's CNI plugin (``plugin``: the executable ``weft-cni``, flannel's plugin under another name)
and the runtime side that calls it the way containerd or CRI-O do (``runtime``: the lab and the
tests make their pods through it).

Kept empty: the plugin's start-up is paid by every pod, so importing ``controlplane.cni.plugin``
must not pull in anything else.
"""
