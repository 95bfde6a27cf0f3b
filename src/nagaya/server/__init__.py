"""nagaya's server: the registry token service, the JSON API and the registry notification sink
(`app`), the site lifecycle that starts it next to the registry (`site`), and its settings.

Importing this package is cheap; FastAPI, SQLAlchemy and the crypto libraries load with `app`/`site` only.
"""
