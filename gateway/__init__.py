"""ifw.gateway"""
