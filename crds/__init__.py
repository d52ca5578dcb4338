"""ifw.crds"""
