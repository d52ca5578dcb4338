"""ifw.runner"""
