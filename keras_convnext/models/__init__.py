"""ConvNeXt model builders."""
