# A WSGI application for gunicorn: says which server answered, and where.
def app(environ, start_response):
    body = f"gunicorn {environ['PATH_INFO']} {environ.get('REMOTE_ADDR', '')}\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("X-Server", "gunicorn")])
    return [body]
