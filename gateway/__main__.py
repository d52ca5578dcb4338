"""`python -m ifw.gateway`: serve the gateway with uvicorn (settings from IFW_GATEWAY_*)."""

from ifw.gateway.app import main

main()
