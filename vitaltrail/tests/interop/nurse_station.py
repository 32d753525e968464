"""A nurse station (paho-mqtt): the independent client of the MQTT alert
topics, with the certificate `vitaltrail viewers add` issued.

usage: nurse_station.py HOST PORT CA CERT KEY listen TOPIC OUT
       nurse_station.py HOST PORT CA CERT KEY try-subscribe TOPIC
       nurse_station.py HOST PORT CA CERT KEY try-publish TOPIC

listen: subscribe to TOPIC at QoS 1 and append each message to OUT as a JSON
line {"topic": ..., "event": <the payload, parsed>}, flushed, until killed;
it writes "subscribed" to OUT + ".ready" once the broker granted it, and
"closed" to OUT + ".closed" when the connection is closed.

try-*: one attempt on a fresh connection; prints one JSON object:
{"connected": bool, "granted": [qos...] or null, "closed": bool}
"""
import json
import ssl
import sys
import threading
import time

import paho.mqtt.client as mqtt


def client(host, port, ca, cert, key, on_message=None):
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="nurse-station", clean_session=False)
    c.tls_set(ca_certs=ca, certfile=cert, keyfile=key, tls_version=ssl.PROTOCOL_TLS_CLIENT)
    state = {"connected": False, "granted": None, "closed": False}
    done = threading.Event()

    def on_connect(cl, userdata, flags, rc, props=None):
        state["connected"] = not rc.is_failure
        done.set()

    def on_disconnect(cl, userdata, flags, rc, props=None):
        state["closed"] = True
        done.set()

    c.on_connect = on_connect
    c.on_disconnect = on_disconnect
    if on_message:
        c.on_message = on_message
    c.connect(host, port, keepalive=30)
    c.loop_start()
    done.wait(10)
    return c, state


def main():
    host, port, ca, cert, key, mode, topic = sys.argv[1:8]
    port = int(port)
    if mode == "listen":
        out_path = sys.argv[8]
        out = open(out_path, "a", encoding="utf-8")
        lock = threading.Lock()

        def on_message(cl, userdata, msg):
            with lock:
                out.write(json.dumps({"topic": msg.topic, "event": json.loads(msg.payload)}) + "\n")
                out.flush()

        c, state = client(host, port, ca, cert, key, on_message)

        def on_subscribe(cl, userdata, mid, granted, props=None):
            with open(out_path + ".ready", "w") as f:
                f.write("subscribed")

        def on_disconnect(cl, userdata, flags, rc, props=None):
            with open(out_path + ".closed", "w") as f:
                f.write("closed")

        c.on_subscribe = on_subscribe
        c.on_disconnect = on_disconnect
        c.subscribe(topic, qos=1)
        while True:
            time.sleep(1)
    c, state = client(host, port, ca, cert, key)
    if state["connected"]:
        if mode == "try-subscribe":
            granted = threading.Event()

            def on_subscribe(cl, userdata, mid, codes, props=None):
                state["granted"] = [int(getattr(x, "value", x)) for x in codes]
                granted.set()

            c.on_subscribe = on_subscribe
            c.subscribe(topic, qos=1)
            granted.wait(3)
        else:
            c.publish(topic, b"{}", qos=1)
        time.sleep(1.5)
    c.loop_stop()
    print(json.dumps(state))


if __name__ == "__main__":
    main()
