"""ifw.operator"""
