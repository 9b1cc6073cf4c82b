from twisted.application.service import ServiceMaker

pager = ServiceMaker("pager", "pager", "An end-to-end encrypted pager server (run: twistd pager server).", "pager")
