from dxflow.master.server import serve

raise SystemExit(serve())
