# The "web app": asks the database and the cache by service name, then serves what it found.
set -e
pw=$(cat "$DATABASE_PASSWORD_FILE")
db=$(wget -q -O- "http://db:$DB_PORT/ready")
cache=$(echo PING | nc cache "$CACHE_PORT")
meta=$(grep -c metadata.internal /etc/hosts)
mkdir -p "/tmp/webapp-$WEB_PORT"
line="web on $(hostname) env=$APP_ENV db=$db cache=$cache secret=${#pw} meta=$meta"
echo "$line" > "/tmp/webapp-$WEB_PORT/index.html"
echo "$line"
exec httpd -f -p "$WEB_PORT" -h "/tmp/webapp-$WEB_PORT"
